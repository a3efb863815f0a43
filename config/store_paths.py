"""How a latent store is named in options and config files: a local path or an object-store URL.

`cogfun precompute --out`, `cogfun train --latents` and `cogfun inspect STORE` take either. A local
path becomes a `Path`, as every other path option does; a URL (`s3://bucket/prefix/latents.zarr`,
`gs://...`, `az://...`: any scheme obstore understands) stays a string, since `Path` would fold its
`//` (`s3:/bucket/...`). The store package (`cogfun.common.store.location`) turns either into a
`Location` where the store is opened.

A URL is checked early, naming the option: an unsupported scheme is refused, and so is a store at
a bucket's root (`s3://bucket`): its writer lock and header-probe folder live beside it, in its
parent. Every other path option (data, model, output folders) stays local, and a URL given to one
is refused naming it.

`--storage-options JSON` (both stages and `cogfun inspect`) configures the object-store client; it
may hold secrets, so it is never recorded: not in a store's attributes, not in a checkpoint's
config, not in a tracker's (`NOT_RECORDED`). Importing this module is cheap: the store package
(zarr) is imported only when a URL or storage options are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STORAGE_OPTIONS = "storage_options"
NOT_RECORDED = (STORAGE_OPTIONS,)  # config fields left out of every file a run writes

STORAGE_OPTIONS_HELP = (
    "JSON object of object-store client options for s3:// gs:// az:// stores (obstore's keys: "
    "endpoint, region, access_key_id, secret_access_key, ...; fsspec's endpoint_url, key, secret "
    "too; retries, retry_backoff_s). Credentials, endpoint and region also come from the usual "
    "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, "
    "AWS_REGION, ...; GOOGLE_* for gs://, AZURE_* for az://), the better place for secrets (a "
    "command line is visible to the machine's other users); these options override them. Never "
    "recorded in the store or in checkpoints."
)


def storage_options_field() -> Any:
    """The `storage_options` field of a stage config (JSON text, None when not given), left out
    of the config's repr too."""
    from cogfun.common.fields import option

    field = option(None, STORAGE_OPTIONS_HELP)
    field.repr = False
    return field


def is_store_url(value: Any) -> bool:
    """Whether `value` names an object-store URL rather than a local path (`file://` is local)."""
    text = str(value)
    return "://" in text and not text.startswith("file://")


def store_path(value: Any) -> Path | str:
    """A store as the options carry it: a `Path` for a local store, the URL string (without a
    trailing `/`) for an object store."""
    if isinstance(value, Path):
        return value
    text = str(value)
    if is_store_url(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text)


def check_store_url(value: Any, flag: str) -> None:
    """Refuse (ValueError naming `flag`) a URL cogfun cannot keep a store at: an unsupported
    scheme, no bucket, or a bucket's root. A local path passes."""
    if not is_store_url(value):
        return
    from cogfun.common.store.location import OBJECT_SCHEMES

    text = str(value)
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in OBJECT_SCHEMES:
        raise ValueError(
            f"{flag} {text}: unsupported URL scheme {scheme!r} (object stores: "
            f"{', '.join(s + '://' for s in OBJECT_SCHEMES)}; or a local path)"
        )
    bucket, _, key = rest.strip("/").partition("/")
    if not bucket:
        raise ValueError(f"{flag} {text}: the URL names no bucket")
    if not key.strip("/"):
        raise ValueError(
            f"{flag} {text}: a store cannot be a bucket's root (its lock and header-probe folder "
            f"are kept beside it): name it inside the bucket, e.g. {scheme}://{bucket}/latents.zarr"
        )


def options_text(value: Any) -> str | None:
    """`--storage-options` as JSON text: a config file may give it as a mapping."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def parse_storage_options(text: str | None) -> dict | None:
    """The `--storage-options` JSON as a dict (None when not given); bad JSON or a non-object is
    refused naming the option (the store package's StoreError)."""
    if text is None:
        return None
    from cogfun.common.store.location import parse_options

    return parse_options(text, "--storage-options")


def apply_storage_options(text: str | None) -> None:
    """Make `--storage-options` the options every store URL of this process is opened with. Not
    given (None): the process keeps its defaults (the environment variables alone), so a stage run
    from inside another (train building its store) does not reset them."""
    options = parse_storage_options(text)
    if options is not None:
        from cogfun.common.store.location import set_default_options

        set_default_options(options)
