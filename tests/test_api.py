"""The top-level Python API: `from captioner import CaptionPipeline` (a lazy import) and
`pipe(images)` on paths, PIL images and tensors, one or many."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).parent.parent


def _images(shapes_dir: Path, n: int) -> list[Path]:
    return sorted((shapes_dir / "images").iterdir())[:n]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory) -> Path:
    from captioner.checkpoint import export_model_folder

    return export_model_folder(tiny_checkpoint, tmp_path_factory.mktemp("api") / "model")


def test_import_captioner_stays_light_and_exports_the_pipeline():
    code = ("import sys, captioner; assert 'torch' not in sys.modules, 'torch imported'; "
            "from captioner import CaptionPipeline; import captioner.inference as i; "
            "assert CaptionPipeline is i.CaptionPipeline; assert 'CaptionPipeline' in dir(captioner)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_pipe_takes_paths_pil_images_tensors_one_or_many(folder, shapes_dir):
    from captioner import CaptionPipeline as Exported

    pipe = Exported.from_pretrained(str(folder), beam_size=2)
    paths = _images(shapes_dir, 3)
    with pytest.deprecated_call():  # the old name, kept one release
        want = [c.text for c in pipe.caption_images([Image.open(p).convert("RGB") for p in paths])]

    one = pipe(paths[0])
    assert one.text == want[0] and one.alphas.dim() == 3
    assert pipe(str(paths[0])).text == want[0]
    assert pipe(Image.open(paths[0])).text == want[0]  # converted to RGB
    # uint8 (3, H, W), as a user's own decoder gives them (torchvision.io's is deprecated)
    pixels = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).contiguous() for p in paths]
    assert pipe(pixels[0]).text == want[0]
    pre = pipe.loaded.preprocessing
    assert pipe(pre(Image.open(paths[0]).convert("RGB"))).text == want[0]  # preprocessed float

    for many in (paths, [str(p) for p in paths], pixels, torch.stack(pixels),
                 [paths[0], Image.open(paths[1]), pixels[2]]):
        got = pipe(many)
        assert isinstance(got, list) and [c.text for c in got] == want
    assert [c.text for c in pipe(paths, batch_size=2)] == want
    assert pipe([]) == []
    with pytest.raises(ValueError, match="preprocessed image"):
        pipe(torch.zeros(3, 7, 7))
    with pytest.raises(TypeError, match="a path, a PIL image or a tensor"):
        pipe([42])
