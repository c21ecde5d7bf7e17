"""The super-resolution network: shapes, the bicubic start, `upsample`, `load_sr`."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lsdc.models.registry import build_model
from lsdc.models.superres import SuperResolution, load_sr, upsample


def _images(n: int = 2, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth images in [0, 1] with an edge (bicubic is close to them but not exact)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size // 4, size // 4, generator=gen)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x[..., : size // 2, : size // 3] += 0.3
    return x.clamp(0, 1)


def _randomise(model: SuperResolution, seed: int = 0) -> SuperResolution:
    """Non-zero weights everywhere (the tail starts at zero), so round trips are meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("scale", [2, 4])
def test_output_shape_per_scale(scale):
    model = SuperResolution(scale=scale, channels=8, num_blocks=1)
    out = model(torch.rand(2, 1, 10, 12))
    assert out.shape == (2, 1, 10 * scale, 12 * scale)


def test_multichannel_input_is_folded_into_the_batch():
    model = _randomise(SuperResolution(channels=8, num_blocks=1))
    x = _images(n=2, c=3)
    out = model(x)
    assert out.shape == (2, 3, 32, 32)
    # Each slice is upsampled on its own: the same as running it alone.
    alone = model(x[1:2, 2:3])
    torch.testing.assert_close(out[1:2, 2:3], alone)


def test_multichannel_network_checks_its_channels():
    model = SuperResolution(channels=8, num_blocks=1, in_chans=3)
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        SuperResolution(scale=3)


def test_untrained_network_is_bicubic():
    model = SuperResolution(scale=2, channels=8, num_blocks=2).eval()
    x = _images()
    bicubic = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bicubic)


def test_registered_in_the_model_registry():
    model = build_model("superres", scale=4, channels=8, num_blocks=1)
    assert isinstance(model, SuperResolution)
    assert model.kwargs["scale"] == 4


def test_upsample_modes():
    x = _images()
    assert upsample(x, 2, "none") is x
    bic = upsample(x, 2, "bicubic")
    assert bic.shape == (2, 1, 32, 32)
    assert float(bic.min()) >= 0.0 and float(bic.max()) <= 1.0
    sr = _randomise(SuperResolution(channels=8, num_blocks=1))
    with torch.no_grad():
        out = upsample(x, 2, "sr", sr)
        torch.testing.assert_close(out, sr(x).clamp(0, 1))


def test_upsample_errors():
    x = _images()
    with pytest.raises(ValueError, match="needs a super-resolution model"):
        upsample(x, 2, "sr")
    with pytest.raises(ValueError, match="mode must be one of"):
        upsample(x, 2, "nearest")
    with pytest.raises(ValueError, match="x2, not x4"):
        upsample(x, 4, "sr", SuperResolution(scale=2, channels=8, num_blocks=1))


def test_load_sr_from_a_run_folder(tmp_path):
    from lsdc.training.superres import save_sr

    model = _randomise(SuperResolution(scale=4, channels=8, num_blocks=2))
    save_sr(model, tmp_path)
    loaded = load_sr(tmp_path)
    assert not loaded.training
    assert loaded.kwargs == model.kwargs
    x = _images(size=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # The weights file itself, with sr.json next to it, works too.
    assert load_sr(tmp_path / "model.safetensors").kwargs == model.kwargs


def test_load_sr_from_bare_safetensors_and_kwargs(tmp_path):
    model = _randomise(SuperResolution(channels=8, num_blocks=1))
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(FileNotFoundError, match="sr.json"):
        load_sr(path)  # no kwargs and no sr.json beside it
    loaded = load_sr(path, kwargs={"channels": 8, "num_blocks": 1})
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="mine.safetensors"):
        load_sr(path, kwargs={"channels": 16, "num_blocks": 1})  # wrong shapes


def test_load_sr_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_sr(missing)
    missing.mkdir()  # a folder without weights names the weights file
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "model.safetensors"))):
        load_sr(missing)
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_sr(tmp_path / "gone.safetensors", kwargs={})
    bad = tmp_path / "run"
    bad.mkdir()
    save_file({"x": torch.zeros(1)}, str(bad / "model.safetensors"))
    (bad / "sr.json").write_text(json.dumps({"channels": 8, "colour": "red"}))
    with pytest.raises(ValueError, match="sr.json"):
        load_sr(bad)
