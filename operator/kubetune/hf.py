"""hf:// locations on the Hugging Face Hub: a revision resolved to its commit, a repository downloaded at one.

Shared by the prepare step and the training pods (trainer/) and by a server pod's model init container (server/):
huggingface_hub is imported only when called, with the token of `$HF_TOKEN` and the endpoint of `$HF_ENDPOINT`.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def download_model(uri: str, at: str | None, folder: Path) -> Path:
    """Every file of the model repository of `uri` at commit `at`, into `folder`."""
    from huggingface_hub import snapshot_download

    repo_id, _, _ = repo(uri)
    snapshot_download(repo_id=repo_id, revision=at, token=token(), local_dir=folder)
    return folder
