"""Which test code a product is: its file and every module it imports from its own folder or package.

A record must name all the code that judged the unit. A product file is
rarely all of it: its fixtures, its helpers and its limits tables often live
in modules beside it, and editing one of those changes verdicts as surely as
editing the product. So a loaded product carries a manifest, each file's path
(relative to the product's folder, or to its top package's folder) and
SHA-256, and one hash over the manifest that every run record is stamped
with; the batch page's "mixed test code" warning compares those.

Which modules count: those the product file imports, directly or through one
another, that live under its *root*: the product's folder, or, when that
folder is a package (it has ``__init__.py``), the folder of its top package.
They are found two ways, both needed: the import statements are read from
the source (so a module already imported by an earlier load still counts),
and every module that importing the product brought in from under the root is
added (so ``importlib.import_module(name)`` counts too). Code elsewhere (the
sequencer, ``phases/``, installed packages) is identified by the sequencer's
version on the record, not here.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

from sequencer.records import SourceFile

__all__ = ["ProductCode", "import_base", "modules_since", "product_code", "product_root"]


@attrs.frozen
class ProductCode:
    """A product's test code as loaded: the manifest and the one hash a record carries."""

    #: the product's folder, or its top package's folder; manifest paths are relative to it
    root: Path
    #: the product file first, then the modules it imports, by path
    files: tuple[SourceFile, ...]

    @property
    def sha256(self) -> str:
        """The product file's SHA-256 when it is the whole code; else the SHA-256 of the manifest.

        The manifest is hashed as ``sha256sum`` prints it (``<sha256>  <path>``,
        one line per file, sorted by path), so ``cd ROOT && sha256sum FILES |
        sha256sum`` gives the same hash. A product that imports nothing of its
        own keeps its file's hash, as records made before manifests have it.
        """
        if len(self.files) == 1:
            return self.files[0].sha256
        lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(self.files, key=lambda f: f.path))
        return hashlib.sha256(lines.encode()).hexdigest()


def product_root(source: Path) -> Path:
    """The folder a product's own modules live in: its folder, or the folder of its top package."""
    root = source.resolve().parent
    while (root / "__init__.py").is_file() and (root.parent / "__init__.py").is_file():
        root = root.parent
    return root


def import_base(source: Path) -> Path:
    """Where the product's absolute imports of its own modules are found (what goes on ``sys.path``).

    The product's folder, as ``python board.py`` would have it; the folder
    above the top package for a product inside a package (``import products.x``).
    """
    root = product_root(source)
    return root.parent if (root / "__init__.py").is_file() else root


def product_code(source: Path, imported: Iterable[object] = ()) -> ProductCode:
    """The manifest of ``source`` and the modules it imports from under its root.

    ``imported``: the modules importing the product brought in (module
    objects); those from under the root are added to what the source's
    import statements name.
    """
    source = source.resolve()
    root = product_root(source)
    found = {source}
    for module in imported:
        path = _module_file(module)
        if path is not None and path.is_relative_to(root):
            found.add(path)
    pending = list(found)
    while pending:
        path = pending.pop()
        for name in _own_imports(path, root):
            if name not in found:
                found.add(name)
                pending.append(name)
    others = sorted(found - {source}, key=lambda p: p.relative_to(root).as_posix())
    return ProductCode(root, tuple(_entry(p, root) for p in (source, *others)))


def modules_since(before: set[str]) -> list[object]:
    """The modules imported since ``before`` (a snapshot of ``sys.modules``' names)."""
    return [m for name, m in list(sys.modules.items()) if name not in before]


def _entry(path: Path, root: Path) -> SourceFile:
    return SourceFile(path.relative_to(root).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest())


def _module_file(module: object) -> Path | None:
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py"):
        return None
    return Path(file).resolve()


def _own_imports(path: Path, root: Path) -> Iterator[Path]:
    """The files under ``root`` that ``path``'s import statements name (packages' ``__init__.py`` included)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return  # the import itself reports a file that does not parse
    absolute = root.parent if (root / "__init__.py").is_file() else root
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _under(root, absolute, alias.name.split("."), ())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
            else:
                base = absolute
            parts = node.module.split(".") if node.module else []
            yield from _under(root, base, parts, tuple(a.name for a in node.names))


def _under(root: Path, base: Path, parts: list[str], names: tuple[str, ...]) -> Iterator[Path]:
    """The files importing ``parts`` (then ``names`` from it) from ``base`` executes, those under ``root``."""
    folder = base
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        package = folder / part
        if (package / "__init__.py").is_file():
            candidate: Path | None = package / "__init__.py"
        elif last and (folder / f"{part}.py").is_file():
            candidate = folder / f"{part}.py"
        else:
            return  # not found here: not one of the product's own modules
        candidate = candidate.resolve()
        if candidate.is_relative_to(root):
            yield candidate
        folder = package
    for name in names:  # `from package import module` imports the module, if it is one
        for candidate in (folder / name / "__init__.py", folder / f"{name}.py"):
            if candidate.is_file() and candidate.resolve().is_relative_to(root):
                yield candidate.resolve()
                break
