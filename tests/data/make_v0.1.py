# Written by dacnn-convert 0.1.0 before the package was split into core/io/train (commit e0d9d03):
#   python tests/data/make_v0.1.py   (then copied here). Never regenerate: the point is old files.
import json
import os

import torch
import torchvision
from dacnn_convert.checkpoint import load, save
from dacnn_convert.sources import parse_spec

import dacnn_convert as dc

torch.manual_seed(0)
out = {}
for name, kw, dtype in [
    ("squeezenet1_1", dict(mode="mix", regulators="all"), "int8"),
    ("resnet18", dict(mode="bank", bank_size=0.0625, factorize_unshared=0.0625), "int8"),
]:
    m = getattr(torchvision.models, name)(num_classes=10).eval()
    p = dc.plan(m, input_size=(3, 32, 32), init="fit", **kw)
    c = dc.convert(m, p)
    path = f"tests/data/v0.1-{name}-{kw['mode']}.safetensors"
    save(c.model, path, source=parse_spec(name, 10), dtype=dtype)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    back = load(path).eval()
    out[os.path.basename(path)] = back(x).tolist()
    print(name, os.path.getsize(path), dc.count_params(c.model))
json.dump(out, open("tests/data/v0.1-outputs.json", "w"))
