"""Deprecated alias of :mod:`jakiro.pretrained` (renamed: it loads pretrained targets and the shipped
drafts); kept for one release."""
import warnings

from jakiro.pretrained import (DEFAULT_TARGET, DRAFTS_DIR, SHIPPED_DRAFTS, cache_dir, convert_gguf,  # noqa: F401
                               load_target, load_tokenizer, package_dir, resolve_target, shipped_draft)

warnings.warn("jakiro.models is now jakiro.pretrained; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
