"""Model folders on the Hugging Face Hub: ``hf://owner/name`` -> a local folder, and uploads.

``huggingface_hub`` is the optional extra ``captioner[hub]``; it is imported only here, and only
when a Hub id is used. Its own settings apply (``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
``HF_TOKEN``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from captioner.model_folder import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, CheckpointError

HUB_PREFIX = "hf://"
INSTALL_HINT = "pip install 'captioner[hub]'"
# The Hub's repository ids: owner/name of letters, digits, '-', '_' and '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_-]")
# Suffixes of local files: a missing `runs/best.ckpt` is a missing file, not a Hub id.
_LOCAL_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".json")


def hub_repo_id(path: str | os.PathLike) -> str | None:
    """The Hub id ``path`` names, or None for a local path: ``hf://owner/name``, or a bare
    ``owner/name`` that is not an existing local file or folder."""
    text = os.fspath(path)
    # pathlib turns "hf://a/b" into "hf:/a/b": the commands' --checkpoint is a Path
    for prefix in (HUB_PREFIX, "hf:/"):
        if text.startswith(prefix):
            repo_id = text[len(prefix):].strip("/")
            if not _REPO_ID.fullmatch(repo_id):
                raise CheckpointError(f"{text}: not a Hub model id (expected hf://owner/name)")
            return repo_id
    if Path(text).exists() or text.endswith(_LOCAL_SUFFIXES) or not _REPO_ID.fullmatch(text):
        return None
    return text


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"the Hugging Face Hub needs the huggingface_hub package: {INSTALL_HINT}") from None
    return huggingface_hub


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of the Hub model ``repo_id`` (``snapshot_download``: from the cache when
    it is there, else downloaded; offline with ``HF_HUB_OFFLINE=1``)."""
    hub = _hub()
    try:
        folder = hub.snapshot_download(repo_id, revision=revision,
                                       allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE])
    except Exception as err:  # not found, offline without a cached copy, no network, gated, ...
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{HUB_PREFIX}{repo_id}: not found on the Hugging Face Hub or in its "
                              f"cache ({type(err).__name__}: {reason})") from None
    return Path(folder)


def upload(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` (a model repository) if needed and upload the model folder to it;
    returns the commit's URL. Needs a token (``hf auth login`` or ``HF_TOKEN``)."""
    api = _hub().HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
                             commit_message="Upload captioner model")
    return str(getattr(info, "commit_url", info))
