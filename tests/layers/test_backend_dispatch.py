"""The layer's choice between the PyTorch and Triton paths: Triton on CUDA tensors, PyTorch on CPU,
overridden by ``backend=`` and then by TTT_MIXER_BACKEND; an unknown or unavailable backend is an
error, never a silent fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_layer
from fla.models.utils import Cache

from ttt_mixer.layers import TTTLayer
from ttt_mixer.layers.checks import BACKEND_ENV, resolve_backend


def run_layer(layer: TTTLayer, x: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of a prefill of ``split`` tokens then token-by-token decoding, and the input grad."""
    x = x.detach().requires_grad_()
    cache = Cache()
    outputs = [layer(x[:, :split], past_key_values=cache, use_cache=True)[0]]
    for t in range(split, x.shape[1]):
        outputs.append(layer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0])
    o = torch.cat(outputs, dim=1)
    (grad,) = torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(), x)
    return o.detach(), grad


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_triton_layer_equals_torch_layer(inner_model: str) -> None:
    torch.manual_seed(0)
    layer = make_layer(inner_model, conv_gate=True, dtype=torch.float32)
    x = torch.randn(2, 9, layer.hidden_size)
    layer.backend = "torch"
    expected = run_layer(layer, x, split=6)
    layer.backend = "triton"
    got = run_layer(layer, x, split=6)
    for e, g in zip(expected, got, strict=True):
        assert (e - g).abs().max() <= 1e-5


def test_default_is_torch_on_cpu_and_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend(None, torch.device("cuda")) == "triton"


def test_argument_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend(None, torch.device("cpu")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"


def test_unknown_backend_names_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        TTTLayer(hidden_size=8, num_heads=2, backend="cuda")
    monkeypatch.setenv(BACKEND_ENV, "jax")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV} must be one of"):
        resolve_backend(None, torch.device("cpu"))


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_is_an_error() -> None:
    code = textwrap.dedent(
        """
        import torch
        from ttt_mixer.layers import TTTLinear
        layer = TTTLinear(hidden_size=8, num_heads=2, mini_batch_size=2, backend="triton")
        try:
            layer(torch.randn(1, 3, 8))
        except RuntimeError as error:
            print("RuntimeError:", error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert "RuntimeError:" in result.stdout and "TRITON_INTERPRET" in result.stdout, result.stderr[-2000:]
