"""The TTT model traces whole: ``torch.compile(fullgraph=True)`` and ``torch.export`` of a forward
without a mask, packing or cache read no value back to the host (no graph break, no data-dependent
guard), and the traced model computes what eager does."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

pytestmark = pytest.mark.slow  # tracing takes tens of seconds on CPU


@pytest.mark.parametrize(("inner", "backbone"), [("mlp", "mamba")])
def test_compile_fullgraph_matches_eager(inner: str, backbone: str) -> None:
    model = make_model(inner, backbone, num_hidden_layers=1)
    ids = torch.randint(3, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        # aot_eager traces forward and backward graphs as inductor would, without compiling C++
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("inner", "backbone"), [("linear", "transformer"), ("mlp", "mamba")])
def test_export_matches_eager(inner: str, backbone: str) -> None:
    model = make_model(inner, backbone, num_hidden_layers=1)
    ids = torch.randint(3, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    kwargs = {"use_cache": False, "return_dict": False}
    exported = torch.export.export(model, (ids,), kwargs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids, **kwargs)[0], expected, rtol=0, atol=1e-6)
