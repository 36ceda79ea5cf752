"""The Python files of an exported model folder, generated from the project's own modules.

The exported model runs the project's single-process model code, not a second copy of it:
every project module the model imports at module level (``pretrain/model/*``, the
``parallel/*`` modules they use, the decoding caches of ``pretrain/hf/cache.py``) is copied
verbatim, with only its import statements rewritten to the flat, relative form that
Hugging Face's ``trust_remote_code`` loader copies along (``from pretrain.model.ema import
DampedEMA`` -> ``from .pretrain_model_ema import DampedEMA``). From modules that carry more
than the model needs (the run config, the pipeline runtime, the data package) only the
definitions asked for are extracted (``pretrain.config.ModelConfig``,
``parallel.pipeline.Stage``, the tokenizers of ``data.tokenizer``), with what they reference.

What the folder cannot hold, megatron-core, DeepSpeed and the distributed runtime, is
imported only inside functions that run under tensor, context or pipeline parallelism or
activation recompute (or as a whole module object, like ``parallel.cpu_compat``); those
imports are bound to ``seqboat_unavailable.UNAVAILABLE``, which raises when used. So the
folder imports nothing but torch, transformers and (for a sentencepiece tokenizer)
sentencepiece. The Hugging Face glue (config, model, tokenizer classes) is the
hand-written ``pretrain/hf/remote/`` package, copied as it is.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

REMOTE = Path(__file__).parent / "remote"
# The Hugging Face glue, copied as it is (its relative imports name generated modules).
TEMPLATES = (
    "configuration_seqboat.py",
    "modeling_seqboat.py",
    "tokenization_seqboat.py",
    "seqboat_unavailable.py",
)
# What the glue imports: whole modules, or (module, names) extracted from a larger one.
ROOTS: dict[str, tuple[str, ...] | None] = {
    "pretrain.model.lm": None,
    "pretrain.model.decode": None,
    "pretrain.hf.cache": None,
    "pretrain.config": ("ModelConfig",),
    "data.tokenizer": ("ByteTokenizer", "SentencePieceTokenizer"),
}
# Modules from which only the imported names are extracted (the others are copied whole).
EXTRACTED = ("pretrain.config", "parallel.pipeline", "data.tokenizer")
# Packages that never enter the folder: their imports are bound to the placeholder.
EXCLUDED = ("pretrain", "parallel", "data", "megatron", "deepspeed")
UNAVAILABLE = "seqboat_unavailable"
_PACKAGES = ("pretrain", "pretrain.model", "pretrain.hf", "parallel", "data")


class BundleError(RuntimeError):
    """The model code imports something the exported folder cannot provide."""


def flat_name(module: str) -> str:
    """``pretrain.model.ema`` -> ``pretrain_model_ema`` (the file in the folder)."""
    return module.replace(".", "_")


def _source(module: str) -> tuple[str, Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BundleError(f"cannot find module {module}")
    path = Path(spec.origin)
    return path.read_text(), path


def _top(module: str) -> str:
    return module.split(".")[0]


@dataclass
class _Rewrite:
    """One import statement's replacement (lines are 1-based, inclusive)."""

    start: int
    end: int
    indent: int
    text: str


class Bundler:
    """Collects the generated files: ``files()`` -> {file name: source}."""

    def __init__(self) -> None:
        self.whole: dict[str, str] = {}  # module -> rewritten source
        self.wanted: dict[str, set[str]] = {}  # extracted module -> names asked for

    def files(self) -> dict[str, str]:
        for module, names in ROOTS.items():
            if names is None:
                self._add_whole(module)
            else:
                self.wanted.setdefault(module, set()).update(names)
        out = {f"{flat_name(m)}.py": src for m, src in self.whole.items()}
        for module, names in sorted(self.wanted.items()):
            out[f"{flat_name(module)}.py"] = self._extract(module, names)
        for template in TEMPLATES:
            out[template] = (REMOTE / template).read_text()
        _check_relative_imports(out)
        return out

    # ----------------------------------------------------------------- whole modules

    def _add_whole(self, module: str) -> None:
        if module in self.whole:
            return
        text, path = _source(module)
        self.whole[module] = ""  # cycles: mark before recursing
        self.whole[module] = _header(path) + self._rewrite(text, module)

    def _rewrite(self, text: str, where: str) -> str:
        """``text`` with its project, megatron-core and DeepSpeed imports rewritten: those at
        module level to the bundled modules, those inside functions (or ``if`` blocks) to
        the placeholder."""
        tree = ast.parse(text)
        top = {id(node) for node in tree.body}
        rewrites = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                replacement = self._import_from(node, where, id(node) in top)
            elif isinstance(node, ast.Import):
                replacement = self._import(node, where)
            else:
                continue
            if replacement is not None:
                rewrites.append(
                    _Rewrite(node.lineno, node.end_lineno or node.lineno, node.col_offset,
                             replacement)
                )  # fmt: skip
        lines = text.splitlines(keepends=True)
        for r in sorted(rewrites, key=lambda r: r.start, reverse=True):
            lines[r.start - 1 : r.end] = [" " * r.indent + r.text + "\n"]
        return "".join(lines)

    def _import_from(self, node: ast.ImportFrom, where: str, module_level: bool) -> str | None:
        module = node.module
        if _top(module) not in EXCLUDED:
            return None
        bound = [a.asname or a.name for a in node.names]
        if not module_level or module in _PACKAGES or _top(module) in ("megatron", "deepspeed"):
            # Lazy imports of the parallel paths, and module objects (``from parallel import
            # cpu_compat``), which the relative-import form cannot carry.
            return self._placeholder(bound)
        if module in EXTRACTED:
            self.wanted.setdefault(module, set()).update(a.name for a in node.names)
        else:
            self._add_whole(module)
        return f"from .{flat_name(module)} import {_names(node)}"

    def _import(self, node: ast.Import, where: str) -> str | None:
        if all(_top(a.name) not in EXCLUDED for a in node.names):
            return None
        return self._placeholder([a.asname or _top(a.name) for a in node.names])

    @staticmethod
    def _placeholder(bound: list[str]) -> str:
        names = ", ".join(f"UNAVAILABLE as {b}" for b in bound)
        return f"from .{UNAVAILABLE} import {names}"

    # ----------------------------------------------------------------- extracted names

    def _extract(self, module: str, names: set[str]) -> str:
        """The top-level definitions ``names`` of ``module`` and those they reference, with
        the module's imports they use; a project import among those is an error."""
        text, path = _source(module)
        tree = ast.parse(text)
        defs: dict[str, ast.stmt] = {}
        imports: dict[str, ast.stmt] = {}
        for node in tree.body:
            for bound in _bound_names(node):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    imports[bound] = node
                else:
                    defs[bound] = node
        keep: list[ast.stmt] = []
        needed_imports: list[ast.stmt] = []
        todo = sorted(names)
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in imports:
                node = imports[name]
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module
                    and (_top(node.module) in EXCLUDED)
                ):
                    raise BundleError(f"{module}.{sorted(names)} needs {node.module}.{name}")
                if node not in needed_imports:
                    needed_imports.append(node)
                continue
            if name not in defs:
                continue  # a builtin or a local name
            node = defs[name]
            if node not in keep:
                keep.append(node)
            todo.extend(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
            todo.extend(
                n.value.id
                for n in ast.walk(node)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            )
        missing = names - set(defs)
        if missing:
            raise BundleError(f"{module} has no top-level {', '.join(sorted(missing))}")
        order = {id(n): i for i, n in enumerate(tree.body)}
        future = [
            n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"
        ]
        body = future + sorted(needed_imports + keep, key=lambda n: order[id(n)])
        lines = text.splitlines()

        def whole_lines(node: ast.stmt) -> str:  # decorators and trailing comments included
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            return "\n".join(lines[start - 1 : node.end_lineno])

        segments = [whole_lines(n) for n in body]
        doc = f'"""{", ".join(sorted(names))} of {module}, extracted for the exported model."""\n'
        return _header(path) + doc + "\n" + "\n\n".join(s for s in segments if s) + "\n"


def _names(node: ast.ImportFrom) -> str:
    return ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Import):
        return [a.asname or _top(a.name) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [] if node.module == "__future__" else [a.asname or a.name for a in node.names]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


def _header(path: Path) -> str:
    try:
        origin = path.relative_to(Path(__file__).resolve().parents[2])
    except ValueError:
        origin = path
    return f"# Generated by `seqboat export` from {origin.as_posix()} (seqboat-pretrain).\n"


def _check_relative_imports(files: dict[str, str]) -> None:
    """Every relative import of every file names a file of the folder, and no file imports
    a project package (the folder must work without the project installed)."""
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if f"{node.module}.py" not in files:
                    raise BundleError(f"{name} imports .{node.module}, which is not bundled")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if _top(node.module) in EXCLUDED:
                    raise BundleError(f"{name} still imports {node.module}")
            elif isinstance(node, ast.Import) and any(_top(a.name) in EXCLUDED for a in node.names):
                raise BundleError(f"{name} still imports {ast.unparse(node)}")


def bundle_files() -> dict[str, str]:
    """{file name: source} of every Python file of an exported model folder."""
    return Bundler().files()
