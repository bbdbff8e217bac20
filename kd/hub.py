"""What the Hugging Face Hub holds besides a repository's main branch, asked without downloading.

Two places where the Hub keeps a usable copy of something the main branch cannot give the kit:

- A model whose main branch has pickle weights only: the Hub's conversion bot (SFconvertbot) opens
  a pull request adding `model.safetensors`, reachable as the revision `refs/pr/<n>` (transformers'
  safetensors_conversion module finds it the same way).
- A dataset that is a loading script (datasets >= 4 runs none): the Hub's dataset viewer may have
  exported it to Parquet on the revision `refs/convert/parquet`.

Each answer is best effort: when the Hub cannot be asked, the caller's advice goes without it.
"""

from __future__ import annotations

import httpx
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

CONVERSION_BOT = "SFconvertbot"
PARQUET_EXPORT = "refs/convert/parquet"
TIMEOUT_S = 10


def safetensors_pull_request(repo_id: str) -> str | None:
    """The revision (`refs/pr/<n>`) of the newest open pull request of the Hub's conversion bot on
    model `repo_id` whose files include safetensors weights, or None."""
    api = HfApi()
    try:
        requests = [d for d in api.get_repo_discussions(repo_id, author=CONVERSION_BOT, discussion_type="pull_request",
                                                        discussion_status="open")]
        for request in sorted(requests, key=lambda d: d.num, reverse=True):
            info = api.model_info(repo_id, revision=request.git_reference, timeout=TIMEOUT_S)
            if any(s.rfilename.endswith(".safetensors") for s in info.siblings or []):
                return request.git_reference
    except (httpx.HTTPError, HfHubHTTPError):
        return None
    return None


def parquet_export(repo_id: str) -> str | None:
    """`refs/convert/parquet` when the Hub holds a Parquet export of dataset `repo_id`, else None."""
    try:
        refs = HfApi().list_repo_refs(repo_id, repo_type="dataset")
    except (httpx.HTTPError, HfHubHTTPError):
        return None
    return PARQUET_EXPORT if any(ref.ref == PARQUET_EXPORT for ref in refs.converts) else None
