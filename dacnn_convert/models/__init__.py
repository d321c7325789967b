"""Architectures built from scratch: the paper's DACNNs."""

from .dacnn import DACNN, DacnnConfig, dacnn, from_name, kernel_and_fc_params

__all__ = ["DACNN", "DacnnConfig", "dacnn", "from_name", "kernel_and_fc_params"]
