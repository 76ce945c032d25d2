"""captioner: image captioning with spatial attention (Show, Attend and Tell).

``from captioner import CaptionPipeline`` is the Python API; it is imported on first use (module
``__getattr__``), so ``import captioner`` stays light (no torch) and ``captioner --help`` fast.
"""

__version__ = "0.1.0"

# The public API, defined in captioner.inference (captioning) and captioner.checkpoint (loading).
_LAZY = ("Caption", "CaptionPipeline", "CheckpointError", "load_checkpoint")
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in ("Caption", "CaptionPipeline"):
        import captioner.inference

        return getattr(captioner.inference, name)
    if name in ("CheckpointError", "load_checkpoint"):
        import captioner.checkpoint

        return getattr(captioner.checkpoint, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
