"""What `retrieval info` reports about one index: counts, configuration, the search
structure answering and why, the whitening and the rules it follows, stored neighbours,
and where FAISS and the kernel run. Read from the published state; nothing is derived."""
from __future__ import annotations

from pathlib import Path

from ..config import EXACT_LIMIT, reranks_by_default
from . import kernel
from .ann import faiss_device, gpu_capable, is_flat
from .neighbours import lists_for_reranking
from .policy import WritePolicy
from .segments import DamagedFile
from .snapshot import State, read_state
from .whitening import PCAWhitening


def index_info(directory: Path, *, images: int, generation: int, patches: int, extractor: dict, search: dict,
               index_type: str | None, policy: WritePolicy, device: str, store: str) -> dict:
    """The `info --json` object of the index in `directory`, whose manifest holds `images`
    images at `generation`; the other arguments are the index's settings as reported."""
    try:
        state = read_state(directory) or State()
    except DamagedFile:
        state = State()
    whitening = None
    if state.whitening is not None:
        try:
            whitening = PCAWhitening.load(directory / state.whitening["file"])
        except ValueError:
            whitening = None
    neighbours, reranking = _neighbours(directory, state, images, whitening is not None and whitening.fitted_)
    return {
        "images": images,
        "patches": images * patches,
        "dim": whitening.output_dim if whitening is not None else 0,
        "extractor": extractor,
        "search": search,
        "index_type": (state.ann or {}).get("factory") or (index_type if not is_flat(index_type) else None) or "exact",
        "structure": _structure(state, index_type, policy),
        "segments": len(state.segments),
        "removed_pending": (state.dead or {}).get("count", 0),
        "whitening": None if whitening is None else {
            **whitening.summary(),
            "source": state.whitening.get("source"),
            "sample_images": state.whitening.get("sample_images"),
            "fitted_at_images": state.whitening.get("images"),
            "refit": policy.refit_rule(state.whitening),
        },
        "policy": policy.summary(),
        "neighbours": neighbours,
        "reranking": reranking,
        # Fast-scan codes have no GPU implementation: such a structure searches on the CPU.
        "faiss_device": faiss_device(device) if state.ann is None or gpu_capable(state.ann["factory"]) else "cpu",
        "native_kernel": kernel.summary(),
        "store": store,
        "up_to_date": state.generation == generation,
        "path": str(directory),
    }


def _neighbours(directory: Path, state: State, images: int, whitened: bool) -> tuple[dict | None, dict]:
    """What `retrieval dba` or the writer stored (None: nothing), and whether images came
    or went since; what `rerank` can do with it (`lists_for_reranking`), and
    whether a query re-ranks by default (`SearchOptions.with_default_rerank`)."""
    found, note, error = lists_for_reranking(directory, state.generation)
    if error is not None:
        return {"error": error}, {"augmentation": False, "by_default": False, "note": note}
    by_default = found is not None and reranks_by_default(images, whitened)
    reranking = {"augmentation": found is not None, "by_default": by_default, "note": note}
    if found is None:
        return None, reranking
    return {**found.meta, "up_to_date": found.meta.get("generation") == state.generation}, reranking


def _structure(state: State, user: str | None, policy: WritePolicy) -> dict:
    """Which search structure answers queries, and why."""
    if state.ann is not None:
        why = "set by --index-type" if not state.ann.get("auto") else (
            f"chosen for {state.ann['windows']} windows (more than {policy.ann_min_images} images); "
            f"re-trained after {policy.retrain_growth}-fold growth"
        )
        if state.ann.get("warning"):
            why = f"{why}; {state.ann['warning']}"
        return {"search": "candidates", "factory": state.ann["factory"], "reason": why,
                "layout_factory": state.ann.get("layout_factory"), "exact_limit": EXACT_LIMIT}
    if is_flat(user):
        why = f"--index-type {user}: the kernel scores every image"
    elif state.note:
        why = state.note
    else:
        why = (f"{state.images} images: up to {policy.ann_min_images} the kernel scores every image exactly, "
               "faster than candidates")
    return {"search": "exact", "factory": None, "reason": why, "exact_limit": EXACT_LIMIT}
