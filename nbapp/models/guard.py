"""A TorchScript file is code: the operators it may run, checked before it runs.

``torch.jit.load`` compiles the TorchScript source stored in a model file and runs its
``__setstate__`` methods while loading; the model's ``forward`` then runs whatever operators
that source names. Among them are operators that read or map files (``aten::from_file``),
write them (``aten::save``), print, fork threads or talk to other processes. A model file
placed where a page can name it would run them as the server's user.

Two checks, one list (:data:`ALLOWED_OPERATORS`: what segmentation networks use: tensor math,
``nn.functional``, interpolation, shape and dtype operations, control flow, int8 quantized
kernels):

1. :func:`check_archive`, **before** ``torch.jit.load``: every function and method in the
   file's ``code/`` (``__setstate__`` included, which loading runs) is parsed as the Python
   syntax it is stored in, and every call in it must name an allowed operator, a builtin of
   TorchScript's language, or a function / method the file itself defines. Anything else
   (``torch.from_file``, ``ops.aten.save``, ``fork(...)``, ``print(...)``, a method call named
   like a refused operator) refuses the file unloaded.
2. :func:`check_module`, **after** loading and before the first forward pass: every method of
   the module and of each submodule, and its hooks, is compiled to a graph, calls are inlined,
   and every node's operator (blocks of ``if`` and loops included) must be in the list. What
   the parser of step 1 could not see (an operator reached through syntax, e.g. ``a[i] = b``)
   is decided here.

What this does not cover: it does not bound what allowed operators compute (a model can still
allocate too much memory or loop for long; nbapp's memory checks and Cancel stand there), and
it trusts torch's own kernels to be free of memory-safety bugs.

>>> "aten::conv2d" in ALLOWED_OPERATORS, "quantized::conv2d" in ALLOWED_OPERATORS
(True, True)
>>> "aten::from_file" in ALLOWED_OPERATORS, "aten::save" in ALLOWED_OPERATORS
(False, False)
"""

from __future__ import annotations

import ast
import functools
import threading
import zipfile
from pathlib import Path

from nbapp.errors import ModelError

__all__ = ["ALLOWED_OPERATORS", "check_archive", "check_module", "module_operators",
           "refused_operators"]


def _ops(namespace: str, names: str) -> set[str]:
    return {f"{namespace}::{n}" for n in names.split()}


#: Every operator a TorchScript model may run in nbapp (one place; tests check that the shipped
#: model, nbapp's exports and fine-tunes, the zoo's architectures and their quantized variants
#: use nothing else, and that crafted files are refused).
ALLOWED_OPERATORS: frozenset[str] = frozenset(
    # control flow, constants, containers, attributes (the TorchScript language itself)
    _ops("prim", """Constant If Loop ListConstruct ListUnpack TupleConstruct TupleIndex TupleUnpack
         TupleSlice DictConstruct GetAttr SetAttr RaiseException Uninitialized unchecked_cast
         dtype device layout shape is_cuda is_quantized requires_grad NumToTensor min max abs
         isinstance AutogradZero data type EnumName EnumValue StringIndex""")
    # scalar and list arithmetic, comparison, strings (TorchScript's operators on Python values)
    | _ops("aten", """Int Float Bool ScalarImplicit FloatImplicit IntImplicit ComplexImplicit
           __contains__ __getitem__ __is__ __isnot__ __not__ __and__ __or__ __xor__ __range_length
           __derive_index __upsample_bilinear __upsample __interpolate _set_item append extend
           insert pop len list dict keys values items copy clear reverse index count sorted sort
           format str warn floordiv remainder neg add sub mul div pow eq ne lt le gt ge abs
           floor ceil round sqrt exp log trunc fabs gcd factorial isnan isinf is_floating_point
           dim size numel sym_size stride is_contiguous device join lower upper strip split
           startswith endswith replace find""")
    # tensor creation, dtype and device moves
    | _ops("aten", """tensor scalar_tensor zeros zeros_like ones ones_like full full_like empty
           empty_like new_zeros new_ones new_full new_empty arange linspace eye to type_as
           contiguous clone detach item""")
    # element-wise math and comparison
    | _ops("aten", """add_ sub_ mul_ div_ rsub true_divide floor_divide neg_ reciprocal rsqrt sqrt_
           exp_ expm1 log_ log1p log2 log10 pow_ square sin cos tan tanh tanh_ atan atan2 sigmoid
           sigmoid_ relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu celu gelu silu silu_
           mish hardtanh hardtanh_ hardsigmoid hardsigmoid_ hardswish hardswish_ softplus
           threshold threshold_ prelu clamp clamp_ clamp_min clamp_min_ clamp_max
           clamp_max_ clip sign erf lerp addcmul addcdiv eq_ ne_ maximum minimum fmax fmin
           logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not
           where masked_fill masked_fill_ nan_to_num lt_ le_ gt_ ge_ round_ floor_ ceil_
           isfinite fill_ zero_ copy_ abs_ exp2 logit""")
    # reductions, sorting, selection
    | _ops("aten", """sum mean std var max min amax amin argmax argmin prod norm
           linalg_vector_norm softmax log_softmax _softmax topk sort argsort cumsum any all
           kthvalue median""")
    # shapes, indexing, joining
    | _ops("aten", """view view_as reshape reshape_as flatten unflatten permute transpose t
           squeeze squeeze_ unsqueeze unsqueeze_ expand expand_as repeat repeat_interleave tile
           cat concat concatenate stack hstack vstack chunk split split_with_sizes unbind narrow
           select slice index index_select gather scatter scatter_ scatter_add scatter_add_
           index_put index_put_ index_add masked_select masked_scatter nonzero flip roll
           movedim meshgrid pad constant_pad_nd reflection_pad1d reflection_pad2d
           replication_pad1d replication_pad2d replication_pad3d pixel_shuffle
           pixel_unshuffle channel_shuffle diag tril triu broadcast_tensors one_hot""")
    # neural-network layers (nn.functional)
    | _ops("aten", """conv1d conv2d conv3d _convolution convolution conv_transpose1d
           conv_transpose2d conv_transpose3d linear matmul mm bmm addmm baddbmm einsum dot
           batch_norm _batch_norm_impl_index native_batch_norm instance_norm group_norm
           layer_norm native_layer_norm dropout dropout_ feature_dropout alpha_dropout
           max_pool1d max_pool2d max_pool3d max_pool2d_with_indices avg_pool1d avg_pool2d
           avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
           adaptive_max_pool1d adaptive_max_pool2d upsample_nearest1d upsample_nearest2d
           upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
           _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d
           upsample_trilinear3d _upsample_bilinear2d_aa _upsample_bicubic2d_aa
           _upsample_lanczos2d_aa grid_sampler grid_sampler_2d affine_grid_generator
           cosine_similarity binary_cross_entropy_with_logits""")
    # int8 models (torch.ao.quantization: the zoo's quantized CPU variants)
    | _ops("aten", """quantize_per_tensor quantize_per_channel dequantize q_scale q_zero_point
           int_repr""")
    # (every kernel of the quantized namespace: int8 / fp16 compute, packing of weights)
    | _ops("quantized", """add add_out add_relu add_relu_out add_scalar add_scalar_out add_scalar_relu
           add_scalar_relu_out batch_norm batch_norm1d batch_norm1d_relu batch_norm2d
           batch_norm2d_relu batch_norm3d batch_norm3d_relu batch_norm_relu cat cat_out
           cat_relu cat_relu_out celu clamp conv1d conv1d_dynamic conv1d_prepack
           conv1d_relu conv1d_unpack conv2d conv2d_add conv2d_add_relu conv2d_dilation
           conv2d_dynamic conv2d_groups conv2d_output_padding conv2d_padding
           conv2d_prepack conv2d_relu conv2d_stride conv2d_transpose conv2d_unpack
           conv2d_unpack_sizes conv3d conv3d_dilation conv3d_dynamic conv3d_groups
           conv3d_output_padding conv3d_padding conv3d_prepack conv3d_relu conv3d_stride
           conv3d_transpose conv3d_unpack conv_prepack conv_transpose1d
           conv_transpose1d_dynamic conv_transpose1d_prepack conv_transpose1d_unpack
           conv_transpose2d conv_transpose2d_dilation conv_transpose2d_dynamic
           conv_transpose2d_groups conv_transpose2d_output_padding
           conv_transpose2d_padding conv_transpose2d_prepack conv_transpose2d_stride
           conv_transpose2d_transpose conv_transpose2d_unpack conv_transpose3d
           conv_transpose3d_dilation conv_transpose3d_dynamic conv_transpose3d_groups
           conv_transpose3d_output_padding conv_transpose3d_padding
           conv_transpose3d_prepack conv_transpose3d_stride conv_transpose3d_transpose
           conv_transpose3d_unpack conv_unpack dropout elu embedding_4bit
           embedding_bag_2bit_prepack embedding_bag_2bit_prepack_with_rowwise_min_max
           embedding_bag_2bit_rowwise_offsets embedding_bag_2bit_unpack
           embedding_bag_4bit embedding_bag_4bit_prepack
           embedding_bag_4bit_prepack_with_rowwise_min_max
           embedding_bag_4bit_rowwise_offsets embedding_bag_4bit_unpack
           embedding_bag_byte embedding_bag_byte_prepack
           embedding_bag_byte_prepack_with_rowwise_min_max
           embedding_bag_byte_rowwise_offsets embedding_bag_byte_unpack
           embedding_bag_prepack embedding_bag_unpack embedding_byte group_norm
           hardswish instance_norm int4mm_packed_weight_cpu layer_norm leaky_relu linear
           linear_dynamic linear_dynamic_fp16 linear_dynamic_fp16_unpacked_weight
           linear_leaky_relu linear_prepack linear_prepack_fp16
           linear_prepack_fp16_legacy linear_prepack_legacy linear_relu
           linear_relu_dynamic linear_relu_dynamic_fp16 linear_tanh linear_unpack
           linear_unpack_fp16 linear_with_input_q_dq_qweight_dq_output_fp32
           linear_with_input_q_dq_qweight_dq_relu_output_fp32 make_quantized_cell_params
           make_quantized_cell_params_dynamic make_quantized_cell_params_fp16 matmul
           max_pool1d max_pool2d mul mul_out mul_relu mul_relu_out mul_scalar
           mul_scalar_out mul_scalar_relu mul_scalar_relu_out prelu
           quantized_gru_cell_dynamic quantized_lstm_cell_dynamic
           quantized_rnn_relu_cell_dynamic quantized_rnn_tanh_cell_dynamic relu6 sigmoid
           softmax threshold"""))

#: Methods of torch's own C++ classes that a quantized model's graph may call.
_ALLOWED_CLASSES = ("__torch__.torch.classes.quantized.",)
#: ... and their method names as the stored source calls them (checked by class in step 2).
_CLASS_METHODS = frozenset({"unpack"})

#: Names of TorchScript's language that the stored source calls like functions.
_LANGUAGE = frozenset("""annotate uninitialized unchecked_cast isinstance getattr hasattr int float
    bool str len range enumerate zip list tuple dict min max abs round divmod sum all any
    ord chr hash id sorted reversed""".split())


@functools.lru_cache(maxsize=1)
def _registered() -> dict[str, set[str]]:
    """Every registered operator name, by its name without namespace."""
    import torch

    by_base: dict[str, set[str]] = {}
    for schema in torch._C._jit_get_all_schemas():
        by_base.setdefault(schema.name.split("::", 1)[-1], set()).add(schema.name)
    return by_base


@functools.lru_cache(maxsize=1)
def _allowed_bases() -> frozenset[str]:
    return frozenset(op.split("::", 1)[1] for op in ALLOWED_OPERATORS)


def refused_operators(operators) -> list[str]:
    """The operators of ``operators`` (node kinds such as ``aten::conv2d``) outside the list.

    >>> refused_operators(["aten::conv2d", "aten::from_file", "prim::If"])
    ['aten::from_file']
    """
    return sorted({op for op in operators if op not in ALLOWED_OPERATORS})


def _refuse(source, what: str) -> ModelError:
    return ModelError(f"{source} is refused: it calls {what}, which a segmentation model does not "
                      "need (a TorchScript file is code; nbapp runs only operators on its "
                      "allow-list, nbapp.models.guard.ALLOWED_OPERATORS)")


# -- 1. before loading: the stored source -------------------------------------------------------

#: ``ast.parse`` is not thread-safe in CPython 3.11 (its recursion counter is shared: two
#: threads parsing at once raised "SystemError: AST constructor recursion depth mismatch" when
#: two Dask worker threads loaded the model together).
_PARSE_LOCK = threading.Lock()


def _dotted(node) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _call_refusal(func, defined: set[str]) -> str | None:
    """Why a call in stored TorchScript source is refused, or None."""
    dotted = _dotted(func)
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name is None:
        return "a call of a computed function"
    if dotted and dotted[0] == "__torch__":  # a function the file defines, fully qualified
        return None if name in defined else f"'{'.'.join(dotted)}', which the file does not define"
    if dotted and len(dotted) >= 3 and dotted[-3] == "ops":  # ops.NS.NAME / torch.ops.NS.NAME
        op = f"{dotted[-2]}::{name}"
        return None if op in ALLOWED_OPERATORS else op
    if dotted and len(dotted) == 2 and dotted[0] == "torch":  # torch.NAME: aten / prim
        if f"aten::{name}" in ALLOWED_OPERATORS or f"prim::{name}" in ALLOWED_OPERATORS:
            return None
        return f"torch.{name}"
    if isinstance(func, ast.Name) and name in _LANGUAGE:
        return None
    if name in _allowed_bases() or name in _CLASS_METHODS:
        return None
    if name in defined and name not in _registered():
        return None
    ops = sorted(_registered().get(name, ())) or [name]
    return f"{ops[0]}" if isinstance(func, ast.Name) else f"'.{name}(...)' ({ops[0]})"


def check_archive(path: str | Path) -> None:
    """Refuse a TorchScript file, before it is loaded, whose stored source calls anything but
    allowed operators, TorchScript's builtins and its own functions.

    Raises :class:`~nbapp.errors.ModelError` with one line naming the first refused call, or
    when the file's source cannot be read and checked.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            sources = {n: z.read(n) for n in z.namelist()
                       if "/code/" in f"/{n}" and n.endswith(".py")}
    except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot read its TorchScript source to check it "
                         f"({exc.__class__.__name__})") from None
    trees = []
    for name, raw in sorted(sources.items()):
        try:
            with _PARSE_LOCK:
                trees.append((name, ast.parse(raw.decode("utf-8"), filename=name)))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            raise ModelError(f"{path} is refused: its stored source {name} cannot be parsed, so "
                             "it cannot be checked") from None
    nodes = [(name, list(ast.walk(tree))) for name, tree in trees]  # one walk per file
    defined = {node.name for _, found in nodes for node in found
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for name, found in nodes:
        # the printer binds functions to locals first (``_1 = __torch__.F.interpolate``): a
        # call of a local is checked as a call of everything the local is bound to
        aliases: dict[str, list] = {}
        for node in found:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute)
                    and _dotted(node.value)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        aliases.setdefault(target.id, []).append(node.value)
        for node in found:
            if isinstance(node, ast.Call):
                funcs = aliases.get(getattr(node.func, "id", None)) or [node.func]
                for func in funcs:
                    why = _call_refusal(func, defined)
                    if why is not None:
                        raise _refuse(path, f"{why} (in {name}, line {node.lineno})")
            elif isinstance(node, (ast.Lambda, ast.AsyncFunctionDef, ast.Await, ast.Global,
                                   ast.Nonlocal)):
                raise ModelError(f"{path} is refused: its stored source {name} has a "
                                 f"{type(node).__name__} statement (line {node.lineno}), which "
                                 "TorchScript does not write")


# -- 2. after loading: the compiled graphs ------------------------------------------------------

def _nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _graphs(module):
    """(where, graph) of every method and hook of ``module`` and its submodules, inlined (once
    per compiled type: TorchScript gives instances with other code other types)."""
    import torch

    seen: set = set()
    for prefix, sub in module.named_modules():
        c = sub._c
        kind = c._type().qualified_name()  # submodules of one compiled type share their code
        if kind in seen:
            continue
        seen.add(kind)
        functions = [(name, c._get_method(name)) for name in c._method_names()]
        functions += [(f"hook {h.name}", h) for h in (*c._get_forward_pre_hooks(),
                                                      *c._get_forward_hooks())]
        for name, fn in functions:
            graph = fn.graph.copy()
            torch._C._jit_pass_inline(graph)
            yield f"{prefix + '.' if prefix else ''}{name}", graph


def module_operators(module) -> dict[str, str]:
    """Every operator of a scripted module's graphs: ``{operator: where it is first used}``.

    A call of a method of a C++ class (which inlining cannot enter) counts as the operator
    ``class::QUALIFIED.NAME.METHOD``.
    """
    found: dict[str, str] = {}
    for where, graph in _graphs(module):
        for node in _nodes(graph.block()) if hasattr(graph, "block") else graph.nodes():
            kind = node.kind()
            if kind == "prim::CallMethod":
                owner = next(node.inputs()).type()
                kind = f"class::{getattr(owner, 'qualified_name', lambda: str(owner))()}" \
                       f".{node.s('name')}"
            found.setdefault(kind, where)
    return found


def check_module(module, source) -> None:
    """Refuse a loaded TorchScript module whose graphs run an operator outside the list.

    Raises :class:`~nbapp.errors.ModelError` with one line naming the operator and the method
    that uses it. A module that is not TorchScript (an ``nn.Module`` the caller built in
    Python) is the caller's own code and is not checked.
    """
    import torch

    if not isinstance(module, torch.jit.ScriptModule):
        return
    for op, where in module_operators(module).items():
        if op.startswith("class::"):
            if op[len("class::"):].startswith(_ALLOWED_CLASSES):
                continue
        elif op in ALLOWED_OPERATORS:
            continue
        raise _refuse(source, f"{op} (in {where})")
