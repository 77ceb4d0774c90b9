"""Every config leaf is read by the runtime code, and the README's configuration reference is current.

A leaf is a key of ``daemon.config.Config`` (``tools.config_reference.leaves``: sections walked
into, ``products.<p>`` as ``products.*``). It counts as read when the code of ``daemon/``,
``workers/`` or ``sensors/`` (not the tools, not the tests) reads the attribute from its section,
found by AST:

* ``<expr>.<section>.<field>`` (``self.cfg.workers.max_batch``);
* ``<name>.<field>`` where ``<name>`` was bound to ``<expr>.<section>`` in the same module
  (``w = cfg.workers``, also in a tuple assignment), or is a parameter annotated with the
  section's class (``cfg: HttpConfig``), also through ``self.<attr>`` assigned from one;
* ``<expr>.products[...].<field>`` / ``.products.get(...)`` and names bound from those or from
  iterating ``.products.items()`` / ``.values()``;
* ``self.<field>`` inside the section's own class (its methods, e.g. ``WorkersConfig.deadline_s``).

A leaf nobody reads is a setting that does nothing: remove it or make it work.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from daemon.config import Config, Section
from tools.config_reference import _dict_value_model, leaves

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("daemon", "workers", "sensors")


def _sections() -> tuple[dict[str, str], dict[str, str]]:
    """Section path by its last key (``"workers"`` → ``"workers"``, ``"products"`` → ``"products.*"``)
    and by its class name (``"HttpConfig"`` → ``"http"``)."""
    by_key: dict[str, str] = {}
    by_class: dict[str, str] = {}

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = _dict_value_model(ann)
            if isinstance(ann, type) and issubclass(ann, Section):
                path = f"{prefix}{name}"
                by_key[name], by_class[ann.__name__] = path, path
                walk(ann, path + ".")
            elif inner is not None and issubclass(inner, Section):
                path = f"{prefix}{name}.*"
                by_key[name], by_class[inner.__name__] = path, path
                walk(inner, path + ".")

    walk(Config, "")
    return by_key, by_class


class _Reads(ast.NodeVisitor):
    """Collects ``(section path, field)`` pairs read in one module (see the module docstring)."""

    def __init__(self, by_key: dict[str, str], by_class: dict[str, str]) -> None:
        self.by_key, self.by_class = by_key, by_class
        self.alias: dict[str, str] = {}  # "w" or "self.cfg" → section path
        self.reads: set[tuple[str, str]] = set()
        self.cls: list[str] = []

    def section_of(self, node: ast.expr) -> str | None:
        """The section path an expression evaluates to, when it can be told."""
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted in self.alias:
                return self.alias[dotted]
            if node.attr in self.by_key and not self.by_key[node.attr].endswith("*"):
                return self.by_key[node.attr]
        if isinstance(node, ast.Name):
            return self.alias.get(node.id)
        if isinstance(node, ast.Subscript):  # cfg.products[p]
            base = self._dict_section(node.value)
            return base
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            return self._dict_section(node.func.value)  # cfg.products.get(p)
        return None

    def _dict_section(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Attribute) and self.by_key.get(node.attr, "").endswith("*"):
            return self.by_key[node.attr]
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.cls.append(node.name)
        self.generic_visit(node)
        self.cls.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            ann = arg.annotation
            name = ann.id if isinstance(ann, ast.Name) else ann.value if isinstance(ann, ast.Constant) else None
            if isinstance(name, str) and name in self.by_class:
                self.alias[arg.arg] = self.by_class[name]
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Assign(self, node: ast.Assign) -> None:
        pairs = [(t, node.value) for t in node.targets]
        for target in node.targets:  # a, b = x, y
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) \
                    and len(target.elts) == len(node.value.elts):
                pairs += list(zip(target.elts, node.value.elts, strict=True))
        for target, value in pairs:
            section = self.section_of(value)
            if section is not None and (dotted := _dotted(target)) is not None:
                self.alias[dotted] = section
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        it = node.iter
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("items", "values"):
            section = self._dict_section(it.func.value)
            target = node.target
            if section is not None:
                if it.func.attr == "items" and isinstance(target, ast.Tuple) and len(target.elts) == 2:
                    target = target.elts[1]
                if isinstance(target, ast.Name):
                    self.alias[target.id] = section
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        section = self.section_of(node.value)
        if section is not None:
            self.reads.add((section, node.attr))
        if isinstance(node.value, ast.Name) and node.value.id == "self" and self.cls:
            own = self.by_class.get(self.cls[-1])
            if own is not None:
                self.reads.add((own, node.attr))
        self.generic_visit(node)


def _dotted(node: ast.expr) -> str | None:
    """``a`` or ``self.cfg`` for a name or an attribute of a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def runtime_reads() -> set[tuple[str, str]]:
    """Every (section path, field) read in the runtime packages. Two passes per module, so an
    alias bound late in a file (``self.cfg = cfg`` in ``__init__`` after a method) still counts."""
    by_key, by_class = _sections()
    reads: set[tuple[str, str]] = set()
    for package in RUNTIME:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            visitor = _Reads(by_key, by_class)
            visitor.visit(tree)
            visitor.visit(tree)
            reads |= visitor.reads
    return reads


def test_every_config_leaf_is_read_by_the_runtime() -> None:
    reads = runtime_reads()
    unread = [".".join(leaf.path) for leaf in leaves()
              if (".".join(leaf.path[:-1]), leaf.path[-1]) not in reads]
    assert not unread, f"config keys nothing in {', '.join(RUNTIME)} reads: {unread}"


def test_the_walk_sees_every_section_and_leaf() -> None:
    """The walk itself: a known leaf of each kind is found, and every leaf has a description."""
    paths = {leaf.path for leaf in leaves()}
    assert {("ingest", "endpoint"), ("workers", "large_nice"), ("products", "*", "threshold"),
            ("products", "*", "scorer")} <= paths
    assert len(paths) > 60
    undocumented = [".".join(leaf.path) for leaf in leaves() if not leaf.description]
    assert not undocumented, f"config keys without a description (a docstring under the field): {undocumented}"


def test_readme_configuration_reference_is_current() -> None:
    run = subprocess.run([sys.executable, "-m", "tools.config_reference", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_reference_is_valid_yaml_with_the_defaults() -> None:
    """The generated block parses, and (placeholder product aside) loads as the default config."""
    import yaml

    from tools.config_reference import reference

    data = yaml.safe_load(reference())
    assert data["ingest"]["endpoint"] == Config().ingest.endpoint
    products = data.pop("products")
    assert list(products) == ["<product>"]
    assert Config.model_validate(data) == Config()


def test_the_detector_tells_read_from_unread() -> None:
    """The AST rules on a small module: what it reads is found, what it does not is not."""
    source = '''
class Svc:
    def __init__(self, cfg, http: HttpConfig):
        self.h, self.n = http, 1
        w = cfg.workers
        self.batch = w.max_batch
        self.wait = cfg.ingest.max_wait_ms
        for name, pc in cfg.products.items():
            print(pc.threshold)
    def port(self):
        return self.h.port
'''
    visitor = _Reads(*_sections())
    tree = ast.parse(source)
    visitor.visit(tree)
    visitor.visit(tree)
    assert {("workers", "max_batch"), ("ingest", "max_wait_ms"), ("products.*", "threshold"),
            ("http", "port")} <= visitor.reads
    assert ("workers", "retries") not in visitor.reads and ("http", "host") not in visitor.reads
