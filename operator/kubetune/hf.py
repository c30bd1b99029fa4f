"""hf:// locations on the Hugging Face Hub: a revision resolved to its commit, a repository downloaded at one.

Shared by the prepare step and the training pods (trainer/) and by a server pod's model init container (server/):
huggingface_hub is imported only when called, with the token of `$HF_TOKEN` and the endpoint of `$HF_ENDPOINT`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import storage


def repo(uri: str) -> tuple[str, str, str | None]:
    """hf://ORG/NAME[/FILE][@REV] as (ORG/NAME, FILE or "", REV or None)."""
    loc = storage.parse(uri)
    org, _, rest = f"{loc.root}/{loc.path}".partition("/")
    name, _, file = rest.partition("/")
    return f"{org}/{name}", file, loc.revision


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def commit(uri: str, repo_type: str, revision: str | None = None) -> str:
    """The commit sha the revision of hf://ORG/NAME[/FILE][@REV] (else `revision`, else the default branch) names
    now: one repository-info request, which also checks that the repository exists and the token may read it."""
    from huggingface_hub import HfApi

    repo_id, _, written = repo(uri)
    info = HfApi(token=token()).repo_info(repo_id, repo_type=repo_type, revision=written or revision)
    if not info.sha:
        raise ValueError(f"the hub named no commit for {uri}")
    return str(info.sha)


def download_model(
    uri: str, at: str | None, folder: Path, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Every file of the model repository of `uri` at commit `at`, into `folder`; `progress(done, total)` with the
    bytes written as they arrive (the total grows as each file's download starts)."""
    from huggingface_hub import snapshot_download

    repo_id, _, _ = repo(uri)
    bars = progress_bars(progress) if progress else None
    snapshot_download(repo_id=repo_id, revision=at, token=token(), local_dir=folder, tqdm_class=bars)
    return folder


def progress_bars(progress: Callable[[int, int], None]) -> type:
    """A tqdm class for snapshot_download that draws nothing and passes its bytes bar on to `progress`.

    huggingface_hub sums every file's bytes into one bar (described "Reconstructing ...", unit B) made of the class
    it is given; its other bars (files done; bytes received from the network) are left alone."""
    from tqdm.auto import tqdm

    class Bars(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.reports = kwargs.get("unit") == "B" and str(kwargs.get("desc", "")).startswith("Reconstructing")
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.reports:
                progress(int(self.n), int(self.total or 0))
            return shown

    return Bars
