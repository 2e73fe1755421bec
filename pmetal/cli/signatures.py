"""The settings of a signature, read from the imported object or from its source file.

`signature_settings(obj)` reads an imported class's `__init__` (and, through `**kwargs`, its bases')
or a function. `static_settings("package.module:Name")` reads the same from source, importing
nothing: `pmetal train --help` must not pay for importing Lightning, transformers and PEFT
(seconds) just to list the flags. It follows base classes across pmetal's files by their imports,
evaluates annotations over `typing`'s names (anything else becomes an opaque type), follows
module constants for defaults, and parses the docstrings. It gives the same `Setting`s as
`signature_settings` (tests/unit/test_cli_flags.py), and None for anything it cannot read, so the
caller imports instead.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Setting:
    """One parameter of a signature: its name, type, default and docstring text."""

    name: str
    annotation: Any
    default: Any  # REQUIRED when it has none
    doc: str
    owner: str  # the class or function that declares it


def parse_docs(texts) -> dict[str, str]:
    """Parameter name -> its text, from the `Args:` sections of docstrings (the first wins)."""
    import docstring_parser

    docs: dict[str, str] = {}
    for text in texts:
        for p in docstring_parser.parse(text or "").params:
            docs.setdefault(p.arg_name.lstrip("*"), " ".join((p.description or "").split()))
    return docs


def _docs(obj) -> dict[str, str]:
    texts = [obj.__doc__]
    if isinstance(obj, type) and "__init__" in vars(obj):
        texts.append(vars(obj)["__init__"].__doc__)  # "Args:" may sit in either docstring
    return parse_docs(texts)


_FRAMEWORKS = ("lightning.", "torch.", "builtins")  # their __init__(*args, **kwargs) ends the walk


def signature_settings(target) -> dict[str, Setting]:
    """The parameters of a function, or of a class's `__init__` and, through `**kwargs`, its bases'.

    The most derived declaration of a name wins (its default and its docstring text); the walk
    stops at the first `__init__` without `**kwargs`, or at Lightning's and torch's own bases.
    """
    owners = [target] if not isinstance(target, type) else [
        c for c in target.__mro__ if "__init__" in vars(c) and not c.__module__.startswith(_FRAMEWORKS)
    ]
    settings: dict[str, Setting] = {}
    docs: dict[str, str] = {}
    for owner in owners:
        for name, text in _docs(owner).items():
            docs.setdefault(name, text)
    for owner in owners:
        function = owner.__init__ if isinstance(owner, type) else owner
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # an annotation naming what only a type checker imports: left untyped
            hints = {}
        more = False
        for p in list(inspect.signature(function).parameters.values())[1 if isinstance(owner, type) else 0 :]:
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in settings:
                settings[p.name] = Setting(p.name, hints.get(p.name, Any), p.default, docs.get(p.name, ""),
                                           owner.__qualname__)
        if not more:
            break
    return settings


# ---------------------------------------------------------------------------------- from source
_TYPING = {name: getattr(typing, name) for name in ("Optional", "Union", "Literal", "Any", "Callable", "Sequence")}
_BUILTINS = {"list": list, "tuple": tuple, "dict": dict, "set": set, "str": str, "int": int, "float": float,
             "bool": bool, "bytes": bytes, "None": None, "type": type}


class _OpaqueMeta(type):
    def __getattr__(cls, name):  # torch.dtype, L.Trainer, ...
        return cls

    def __getitem__(cls, item):
        return cls


class Opaque(metaclass=_OpaqueMeta):
    """A type the static reader does not know (a class from a library); it has no command-line form."""


class _Unreadable(Exception):
    pass


@lru_cache(maxsize=None)
def _module(name: str) -> tuple[ast.Module, dict[str, ast.AST], dict[str, tuple[str, str]]] | None:
    """(tree, module-level definitions and assignments, imported names -> (module, attribute))."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
    defined: dict[str, ast.AST] = {}
    imported: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            defined[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defined[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            defined[node.target.id] = node.value
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = (alias.name, "")
    return tree, defined, imported


def _lookup(module: str, name: str) -> tuple[str, ast.AST]:
    """The module-level node `name` means in `module`, following pmetal's own imports."""
    info = _module(module)
    if info is None:
        raise _Unreadable(module)
    _, defined, imported = info
    if name in defined:
        return module, defined[name]
    if name in imported and imported[name][1] and imported[name][0].startswith("pmetal"):
        return _lookup(*imported[name])
    raise _Unreadable(f"{module}.{name}")


class _Names(dict):
    """The evaluation namespace of an annotation in `module`: typing's names, aliases, or Opaque."""

    def __init__(self, module: str):
        super().__init__()
        self.module = module

    def __missing__(self, name: str) -> Any:
        if name in _TYPING:
            return _TYPING[name]
        if name in _BUILTINS:
            return _BUILTINS[name]
        try:
            where, node = _lookup(self.module, name)
        except _Unreadable:
            return Opaque
        if isinstance(node, ast.expr):  # a type alias: LoggerName = Literal[...]
            return _annotation(node, where)
        return Opaque


def _annotation(node: ast.AST | None, module: str) -> Any:
    if node is None:
        return Any
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        node = ast.parse(node.value, mode="eval").body
    return eval(compile(ast.Expression(node), module, "eval"), {"__builtins__": {}}, _Names(module))  # noqa: S307


def _default(node: ast.AST, module: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):  # a module constant, possibly imported
        where, value = _lookup(module, node.id)
        if isinstance(value, ast.expr):
            return _default(value, where)
    raise _Unreadable(ast.unparse(node))


def _parameters(function: ast.FunctionDef, module: str, skip_self: bool):
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults))[1 if skip_self else 0 :] + list(zip(args.kwonlyargs, args.kw_defaults))
    for arg, default in pairs:
        yield arg.arg, _annotation(arg.annotation, module), default


def _base_chain(module: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
    """The class and its pmetal bases, most derived first.

    Several bases are read only when all but one are mixins: pmetal classes with neither an
    `__init__` nor bases of their own, so they add no settings and leave the order plain.
    """
    chain = [(module, cls)]
    while True:
        module, cls = chain[-1]
        if not cls.bases:
            return chain
        resolved = [_base(module, base) for base in cls.bases]
        main = [(where, node) for where, node in resolved if not _is_mixin(node)]
        if len(main) != 1:
            raise _Unreadable(f"{cls.name}: several bases with settings")
        where, node = main[0]
        if node is None:
            return chain  # L.LightningModule: a framework base ends the walk
        chain.append((where, node))


def _is_mixin(node: ast.ClassDef | None) -> bool:
    return node is not None and not node.bases and not any(
        isinstance(n, ast.FunctionDef) and n.name == "__init__" for n in node.body)


def _base(module: str, base: ast.expr) -> tuple[str, ast.ClassDef | None]:
    """Where a base class is defined; (.., None) for Lightning's and torch's own classes."""
    _, defined, imported = _module(module) or (None, {}, {})
    if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id in imported:
        source, attr = imported[base.value.id]
        source = f"{source}.{attr}" if attr else source
        if not source.startswith("pmetal"):
            return _framework(source, base)
        where, node = _lookup(source, base.attr)
    elif isinstance(base, ast.Name) and base.id in imported and not imported[base.id][0].startswith("pmetal"):
        return _framework(imported[base.id][0], base)
    elif isinstance(base, ast.Name):
        where, node = _lookup(module, base.id)
    else:
        raise _Unreadable(ast.unparse(base))
    if not isinstance(node, ast.ClassDef):
        raise _Unreadable(ast.unparse(base))
    return where, node


def _framework(source: str, base: ast.expr) -> tuple[str, None]:
    if source.split(".")[0] in ("lightning", "torch", "pytorch_lightning"):
        return source, None
    raise _Unreadable(f"{ast.unparse(base)} from {source}")  # another library's base: import it instead


def static_settings(target: str):
    """`flags.Setting`s of "package.module:Name" read from source, or None when it cannot tell."""
    module, _, name = target.partition(":")
    try:
        where, node = _lookup(module, name)
        if isinstance(node, ast.FunctionDef):
            owners = [(where, node, node, False)]
        elif isinstance(node, ast.ClassDef):
            owners = []
            for mod, cls in _base_chain(where, node):
                init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                if init is not None:
                    owners.append((mod, cls, init, True))
        else:
            return None
        docs: dict[str, str] = {}
        for _, owner, function, is_class in owners:
            texts = [ast.get_docstring(owner)] + ([ast.get_docstring(function)] if is_class else [])
            for key, text in parse_docs(texts).items():
                docs.setdefault(key, text)
        settings: dict[str, Any] = {}
        for mod, owner, function, is_class in owners:
            for arg_name, annotation, default in _parameters(function, mod, skip_self=is_class):
                if arg_name not in settings:
                    value = REQUIRED if default is None else _default(default, mod)
                    settings[arg_name] = Setting(arg_name, annotation, value, docs.get(arg_name, ""), owner.name)
            if function.args.kwarg is None:
                break
        return settings
    except (_Unreadable, SyntaxError, TypeError, NameError, AttributeError):
        return None
