"""ONNX backbones: any .onnx file, cut in memory at any tensor (`--onnx-output`).

Quantized models (QLinear* ops, uint8/int8 tensors between them) can be cut anywhere: a
quantized tensor is dequantized at the cut with the scale and zero point its producer
declares, so every cut yields float32 like a float model's.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import DEFAULT_SIZE, PROBE_EXTRA, Backbone, cpu_count, cuda_present, preprocess, rel_err
from ..config import ConfigError, ExtractorConfig, InputSpec, file_digest

NP_DTYPES = {1: "float32", 10: "float16", 11: "float64"}
QUANTIZED_TYPES = (2, 3)  # uint8, int8 (TensorProto element types)

# Where a quantized op's output scale and zero point are among its inputs; ops absent
# here (MaxPool, Reshape, ...) pass their input's quantization through unchanged.
_OUTPUT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearConcat": (0, 1),
}


def quantization_of(model, name: str) -> tuple[str, str] | None:
    """(scale, zero point) tensor names of quantized tensor `name`, from the op that
    produced it (followed through ops that keep their input's quantization); None when
    the graph does not say."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    seen: set[str] = set()
    while name in producer and name not in seen:
        seen.add(name)
        node = producer[name]
        where = _OUTPUT_QPARAMS.get(node.op_type)
        if where is not None:
            scale, zero = where
            return node.input[scale], (node.input[zero] if len(node.input) > zero else "")
        if node.op_type.startswith("QLinear") or not node.input:
            return None
        name = node.input[0]
    return None


def dequantize_at(model, name: str):
    """A copy of `model` with a DequantizeLinear reading quantized tensor `name`;
    -> (model, name of the float32 tensor). Raises ConfigError when the graph does not
    declare the tensor's scale."""
    import onnx
    from onnx import helper

    qparams = quantization_of(model, name)
    if qparams is None:
        raise ConfigError(
            f"--onnx-output {name!r} is a quantized tensor whose scale the graph does not declare; "
            "pick a tensor produced by a QLinear*/QuantizeLinear op (see `retrieval layers`)"
        )
    model = onnx.ModelProto.FromString(model.SerializeToString())
    out = f"{name}:dequantized"
    inputs = [name, qparams[0]] + ([qparams[1]] if qparams[1] else [])
    model.graph.node.append(helper.make_node("DequantizeLinear", inputs, [out], name=out))
    return model, out


def _subgraph_inputs(graph) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    needed: set[str] = set()
    for node in graph.node:
        for name in _node_inputs(node):
            if name not in produced:
                needed.add(name)
        produced.update(o for o in node.output if o)
    return needed


def _node_inputs(node) -> list[str]:
    import onnx

    names = [i for i in node.input if i]
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names.extend(_subgraph_inputs(attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                names.extend(_subgraph_inputs(g))
    return names


def tensor_types(model) -> dict[str, int]:
    """Element type of every tensor of the graph whose type is known or can be inferred."""
    g = model.graph
    types: dict[str, int] = {}
    try:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(model).graph
        sources = list(inferred.value_info) + list(inferred.output)
    except Exception:
        sources = []
    for vi in sources + list(g.value_info) + list(g.output) + list(g.input):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    # Shape inference does not know contrib QLinear* ops: their output has the element
    # type of the zero point they are given (uint8 when none is given).
    inits = {t.name: t.data_type for t in g.initializer}
    for node in g.node:
        where = _OUTPUT_QPARAMS.get(node.op_type)
        if where is not None and node.output[0] not in types:
            zero = node.input[where[1]] if len(node.input) > where[1] else ""
            types[node.output[0]] = inits.get(zero, 2)
    return types


def _tensor_type(model, name: str) -> int | None:
    return tensor_types(model).get(name)


def cut_onnx(model, output: str, dynamic_batch: bool = False, dynamic_hw: bool = False, out_type: int | None = None):
    """A new ModelProto computing only `output` from the graph's real input.

    Own backwards traversal (works on old opsets, initializers listed as inputs, contrib
    ops, where `onnx.utils.extract_model` may fail). Initializer-inputs are dropped (so
    the runtime can constant-fold them); `dynamic_batch` / `dynamic_hw` replace fixed
    input dims 0 / 2, 3 (NCHW; 1, 2 for NHWC) by symbolic ones.
    """
    import onnx
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer: dict[str, int] = {}
    for idx, node in enumerate(g.node):
        for o in node.output:
            if o:
                producer[o] = idx
    real_inputs = {i.name: i for i in g.input if i.name not in inits}
    needed_nodes: set[int] = set()
    needed: set[str] = set()
    stack = [output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            idx = producer[name]
            if idx not in needed_nodes:
                needed_nodes.add(idx)
                stack.extend(_node_inputs(g.node[idx]))
        elif name not in inits and name not in real_inputs:
            raise ValueError(f"tensor {name!r} is neither produced in the graph nor an input/initializer")
    inputs = []
    for name, vi in real_inputs.items():
        if name not in needed:
            continue
        vi = onnx.ValueInfoProto.FromString(vi.SerializeToString())
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            layout = input_layout(vi)
            hw = (2, 3) if layout == "NCHW" else (1, 2)
            for pos, sym in [(0, "batch")] * dynamic_batch + list(zip(hw, ("height", "width"))) * dynamic_hw:
                if dims[pos].HasField("dim_value"):
                    dims[pos].Clear()
                    dims[pos].dim_param = sym
        inputs.append(vi)
    nodes = [g.node[i] for i in sorted(needed_nodes)]
    initializers = [t for name, t in inits.items() if name in needed]
    if out_type is None:
        out_type = _tensor_type(model, output) or onnx.TensorProto.FLOAT
    out_vi = helper.make_tensor_value_info(output, out_type, None)
    graph = helper.make_graph(nodes, f"{g.name or 'graph'}_cut", inputs, [out_vi], initializer=initializers)
    graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in needed)
    cut = helper.make_model(graph, opset_imports=list(model.opset_import))
    # IR >= 4 lets initializers be absent from the inputs
    cut.ir_version = max(model.ir_version, 4)
    cut.functions.extend(model.functions)
    cut.producer_name = "retrieval.backbone"
    return cut


def input_layout(vi) -> str:
    dims = vi.type.tensor_type.shape.dim
    if len(dims) == 4 and dims[1].HasField("dim_value") and dims[1].dim_value == 3:
        return "NCHW"
    if len(dims) == 4 and dims[3].HasField("dim_value") and dims[3].dim_value == 3:
        return "NHWC"
    return "NCHW"


def _dim(d) -> int | None:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


# ONNX Runtime session settings, measured on this project's CPU box (2 shared AVX2 cores)
# with the int8 MobileNetV2, a batch of 32 224x224 inputs: benchmarks/results/describe.md,
# "Faster networks". None = the runtime's own default.
SESSION_OPTIONS: dict[str, Any] = {
    "intra_op_threads": None,  # None: the cores this process may use (cpu_count())
    "inter_op_threads": 1,  # only used by the parallel execution mode
    "execution_mode": "sequential",  # sequential | parallel (runs independent branches at once)
    "graph_optimization": "all",  # all | extended | basic | disabled
    "allow_spinning": False,  # intra-op threads busy-wait for work between ops
    "mem_pattern": True,  # plan activations' memory from the first run's shapes
    "cpu_mem_arena": True,  # keep freed activation memory for the next run
}

_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(ort, **overrides):
    """ort.SessionOptions from SESSION_OPTIONS, updated with `overrides` (same keys)."""
    unknown = set(overrides) - set(SESSION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown session option(s): {', '.join(sorted(unknown))}")
    o = {**SESSION_OPTIONS, **overrides}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(o["intra_op_threads"] or cpu_count())
    opts.inter_op_num_threads = int(o["inter_op_threads"] or 0)
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if o["execution_mode"] == "parallel"
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[o["graph_optimization"]])
    # busy-waiting between ops and runs takes cores from the image decoding threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if o["allow_spinning"] else "0")
    opts.enable_mem_pattern = bool(o["mem_pattern"])
    opts.enable_cpu_mem_arena = bool(o["cpu_mem_arena"])
    return opts


_PREPARED_FORMAT = 1
PREPARED_CACHE_ENV = "RETRIEVAL_ONNX_CACHE"


def _prepared_path(path: str, config: ExtractorConfig, providers: list[str], ort_version: str) -> Path | None:
    """Where the prepared (cut, probed) graph of this model and configuration is kept:
    `$RETRIEVAL_ONNX_CACHE` (`off` disables), else `$XDG_CACHE_HOME/retrieval/onnx`
    (~/.cache). Keyed by the model file's content, so a replaced file is prepared again."""
    where = os.environ.get(PREPARED_CACHE_ENV)
    if where == "off":
        return None
    if not where:
        where = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieval" / "onnx")
    try:
        digest = file_digest(path)
    except OSError:
        return None  # unreadable: the preparation says so
    ident = json.dumps({"model": digest, "output": config.onnx_output, "spec": config.input_spec.to_dict(),
                        "providers": providers, "onnxruntime": ort_version, "format": _PREPARED_FORMAT},
                       sort_keys=True)
    return Path(where).expanduser() / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.onnx"


class OnnxBackbone(Backbone):
    def __init__(self, config: ExtractorConfig, device: str = "auto") -> None:
        import onnxruntime as ort

        self.config = config
        self.path = str(Path(config.onnx).expanduser())
        if not Path(self.path).is_file():
            raise ConfigError(f"--onnx {self.path}: file not found")
        self.providers = self._providers(device, ort)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        cache = _prepared_path(self.path, config, self.providers, ort.__version__)
        if cache is not None and self._restore(cache, ort):
            return
        self._prepare(config, ort)
        if cache is not None:
            self._keep(cache)

    def _prepare(self, config: ExtractorConfig, ort) -> None:
        """Cut the graph, probe which dimensions may be dynamic, check the output."""
        model, out_type = self._cut_source(config.onnx_output)
        base = cut_onnx(model, self.tensor, out_type=out_type)
        elem = self._read_input(base, config)
        self._model, self.session, dyn_b, dyn_h = self._probe_dynamic(model, base, out_type, elem, ort)
        self.batch = None if (dyn_b or self.declared_batch is None) else self.declared_batch
        self.dynamic_size = bool(dyn_h) or self.declared_size is None
        declared, size = self.declared_size, self.input_size
        if not self.dynamic_size and declared is not None and size != declared:
            raise ConfigError(
                f"--input-spec size={size[0]}/{size[1]} but {self.path} only accepts "
                f"{declared[0]}x{declared[1]} inputs"
            )
        self._read_output()

    def _cut_source(self, output: str | None):
        """The model as loaded, with a DequantizeLinear after a quantized `output`; sets
        `output` (the asked tensor) and `tensor` (the one read). ConfigError naming close
        tensor names when `output` is not in the graph."""
        import onnx

        try:
            model = onnx.load(self.path)
        except Exception as err:
            raise ConfigError(f"--onnx {self.path}: not a readable ONNX model ({err})") from None
        g = model.graph
        produced = [o for n in g.node for o in n.output if o]
        self.output = output or g.output[0].name
        if self.output not in set(produced):
            close = difflib.get_close_matches(self.output, produced, n=5)
            raise ConfigError(
                f"--onnx-output {self.output!r} is not a tensor of {self.path}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Graph outputs: {', '.join(o.name for o in g.output)}; "
                f"some valid tensor names (last 15 of {len(produced)}): {', '.join(produced[-15:])}"
            )
        out_type = _tensor_type(model, self.output)
        self.tensor = self.output
        if out_type in QUANTIZED_TYPES:
            model, self.tensor = dequantize_at(model, self.output)
            out_type = onnx.TensorProto.FLOAT
        return model, out_type

    def _read_input(self, base, config: ExtractorConfig) -> int:
        """The cut graph's one image input: its name, layout, declared size and batch, and
        the effective input spec (dtype from the graph, size from the user or the graph);
        returns the input's ONNX element type."""
        if len(base.graph.input) != 1 or len(base.graph.input[0].type.tensor_type.shape.dim) != 4:
            raise ConfigError(
                f"--onnx {self.path}: the graph up to {self.output!r} needs "
                f"{[i.name for i in base.graph.input]}; only models with one 4-D image input are supported"
            )
        vi = base.graph.input[0]
        self.input_name = vi.name
        self.layout = input_layout(vi)
        dims = vi.type.tensor_type.shape.dim
        hw = (dims[2], dims[3]) if self.layout == "NCHW" else (dims[1], dims[2])
        declared = (_dim(hw[0]), _dim(hw[1]))
        declared = declared if None not in declared else None
        elem = vi.type.tensor_type.elem_type
        if elem not in NP_DTYPES:
            raise ConfigError(f"--onnx {self.path}: input {self.input_name!r} has unsupported element type {elem}")
        user = config.input_spec
        size = tuple(user.size) if user.size else (declared or DEFAULT_SIZE)
        self.spec = replace(user, size=size, dtype=NP_DTYPES[elem])
        self.input_size = size
        self.declared_size = declared
        self.declared_batch = _dim(dims[0])
        return elem

    def _probe_dynamic(self, model, base, out_type, elem: int, ort):
        """(graph, session, dynamic batch, dynamic size): the freest cut whose outputs on
        random probes equal the graph as declared, and whose spatial dimensions really
        follow the input's (a graph can accept any size and still pin one inside)."""
        declared_batch, probe_size = self.declared_batch, self.declared_size or self.input_size
        rng = np.random.default_rng(0)
        probe = rng.integers(0, 256, size=(2, probe_size[0], probe_size[1], 3), dtype=np.uint8)
        ref_sess = self._session(base, ort)
        ref = self._run_loop(ref_sess, self._prep(probe), declared_batch)
        tol = 1e-2 if elem == 10 else 1e-3  # float16 graphs
        tries = []
        for b, h in ((True, True), (False, True), (True, False)):
            b = b and declared_batch is not None
            h = h and self.declared_size is not None
            if (b or h) and (b, h) not in tries:
                tries.append((b, h))
        for b, h in tries:
            try:
                m = cut_onnx(model, self.tensor, b, h, out_type=out_type)
                sess = self._session(m, ort)
                got = self._run_loop(sess, self._prep(probe), None if b else declared_batch)
                if got.shape != ref.shape or rel_err(got, ref) > tol:
                    continue
                if h:
                    bigger = (probe_size[0] + PROBE_EXTRA, probe_size[1] + PROBE_EXTRA)
                    img = rng.integers(0, 256, size=(1, bigger[0], bigger[1], 3), dtype=np.uint8)
                    big = self._run_loop(sess, self._prep(img), None if b else declared_batch)
                    if big.ndim == 4 and big.shape[2:] == ref.shape[2:] and ref.shape[2] > 1:
                        continue  # spatial dims ignored: something is pinned inside the graph
                return m, sess, b, h
            except Exception:  # noqa: BLE001 - a cut ONNX Runtime refuses is simply not chosen
                continue
        return base, ref_sess, False, False

    def _read_output(self) -> None:
        """Run one image: the output must be a map [N, C, h, w] or a vector [N, C]."""
        size = self.input_size
        out = self(np.zeros((1, size[0], size[1], 3), np.uint8))
        if out.ndim not in (2, 4):
            raise ConfigError(
                f"--onnx-output {self.output!r} has shape {out.shape[1:]}; need a 4-D map "
                "[N, C, h, w] or a 2-D vector [N, C]"
            )
        self.output_kind = "map" if out.ndim == 4 else "vector"
        self.output_shape = tuple(out.shape[1:])

    @property
    def model(self):
        """The cut graph the session runs (an onnx ModelProto; read from the cache if need be)."""
        if self._model is None:
            import onnx

            self._model = onnx.load_from_string(self._model_file.read_bytes())
        return self._model

    # The outcome of `_prepare`, kept so that the next process with the same model file,
    # output, input spec, providers and onnxruntime skips it: no `onnx` import, no graph
    # surgery, no probe sessions (most of a one-shot `retrieval query`'s start-up).
    _KEPT = ("output", "tensor", "input_name", "layout", "input_size", "declared_size", "declared_batch",
             "batch", "dynamic_size", "output_kind", "output_shape")

    def _restore(self, cache: Path, ort) -> bool:
        try:
            meta = json.loads(cache.with_suffix(".json").read_text())
            if meta.get("format") != _PREPARED_FORMAT:
                return False
            blob = cache.read_bytes()
            session = self._session(blob, ort)
        except Exception:  # noqa: BLE001 - a missing, partial or unreadable entry: prepare again
            return False
        for name in self._KEPT:
            value = meta[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.spec = InputSpec.from_dict(meta["spec"])
        self.session, self._model, self._model_file = session, None, cache
        return True

    def _keep(self, cache: Path) -> None:
        if self._model.ByteSize() >= (1 << 31) - (1 << 26):
            return  # external data: not worth a copy
        meta = {name: getattr(self, name) for name in self._KEPT}
        meta.update(format=_PREPARED_FORMAT, spec=self.spec.to_dict(), source=self.path)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # The graph first, its description last: an entry without its .json is ignored.
            for target, data in ((cache, self._model.SerializeToString()),
                                 (cache.with_suffix(".json"), json.dumps(meta, indent=1).encode())):
                fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".tmp-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
        except OSError:
            pass  # a read-only cache only costs the next process the preparation
        self._model_file = cache

    @staticmethod
    def _providers(device: str, ort) -> list[str]:
        available = ort.get_available_providers()
        want_cuda = device not in ("cpu",) and "CUDAExecutionProvider" in available and cuda_present()
        if device and device.startswith("cuda") and not want_cuda:
            raise ConfigError("--device cuda: onnxruntime has no usable CUDAExecutionProvider here")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]

    def _session(self, model, ort, **overrides):
        """An InferenceSession of `model` on self.providers with SESSION_OPTIONS (each of
        which `overrides` may replace; benchmarks/network_speed.py measures them)."""
        opts = session_options(ort, **overrides)
        if isinstance(model, bytes):
            return ort.InferenceSession(model, sess_options=opts, providers=self.providers)
        blob = model.SerializeToString() if model.ByteSize() < (1 << 31) - (1 << 26) else None
        if blob is not None:
            return ort.InferenceSession(blob, sess_options=opts, providers=self.providers)
        import onnx

        with tempfile.TemporaryDirectory(prefix="retrieval-onnx-") as tmp:
            path = os.path.join(tmp, "cut.onnx")
            onnx.save(model, path, save_as_external_data=True, location="cut.onnx.data")
            return ort.InferenceSession(path, sess_options=opts, providers=self.providers)

    def _prep(self, images: np.ndarray) -> np.ndarray:
        return preprocess(images, self.spec, self.layout)

    def _run_loop(self, sess, x: np.ndarray, batch: int | None) -> np.ndarray:
        if batch is None:
            out = sess.run([self.tensor], {self.input_name: x})[0]
            return np.asarray(out, dtype=np.float32)
        outs = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            n = len(chunk)
            if n < batch:  # pad the last chunk of a fixed-batch graph
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
            outs.append(np.asarray(sess.run([self.tensor], {self.input_name: chunk})[0][:n], dtype=np.float32))
        return np.concatenate(outs)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._run_loop(self.session, self._prep(images), self.batch))

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "onnx",
            "file": self.path,
            "output": self.output,
            "dequantized": self.tensor != self.output,
            "input": self.input_name,
            "provider": self.session.get_providers()[0],
            "device": self.device,
            "weights": "pretrained",
            "input_size": list(self.input_size),
            "dynamic_size": self.dynamic_size,
            "batch": self.batch or "dynamic",
            "output_kind": self.output_kind,
            "output_shape": list(self.output_shape),
            "input_spec": self.spec.to_dict(),
        }
