"""Product files: loading, graph validation and limits files, each error one line naming the place."""

from __future__ import annotations

import hashlib
import textwrap
import uuid
from pathlib import Path

import pytest

from reports.storage.store import LocalStore
from sequencer import Measurement, Product, phase
from sequencer.engine import RunSettings
from sequencer.events import EventBus
from sequencer.product import ProductError, layers, load_product, validate_product
from sequencer.station import run_station

HEADER = "from sequencer import Measurement, Product, phase\n"


def write(tmp_path: Path, body: str, name: str = "prod.py") -> Path:
    p = tmp_path / name
    p.write_text(HEADER + textwrap.dedent(body))
    return p


GOOD = """
@phase(measurements=[Measurement("vdd", units="V").in_range(3.2, 3.4), Measurement("fw").equals("1.0")])
async def rails(ctx):
    ctx.measurements.vdd = 3.3
    ctx.measurements.fw = "1.0"

@phase(after=[rails])
async def sensor(ctx):
    pass

@phase(after=[rails])
async def selftest(ctx):
    pass

@phase(teardown=True)
async def power_off(ctx):
    pass

product = Product("widget", [rails, sensor, selftest, power_off], version="1.0")
"""


async def noop() -> None:
    pass


def test_good_product_loads_and_layers(tmp_path: Path) -> None:
    loaded = load_product(write(tmp_path, GOOD))
    assert loaded.name == "widget"
    assert loaded.limits_file is None
    assert layers(loaded.product) == [["rails"], ["sensor", "selftest"]]


@pytest.mark.parametrize(
    "body, message",
    [
        ("product = Product('x', [)\n", r"prod.py:2: syntax error"),
        ("import not_a_module_anywhere\n", r"prod.py:2: does not import: ModuleNotFoundError"),
        ("x = 1\n", r"prod.py: defines no `product = Product\(...\)`"),
        ("def f(): pass\nproduct = Product('x', [f])\n", r"is not a phase \(decorate it with @phase\)"),
        ("@phase\ndef sync(ctx): pass\n", r"phase 'sync': .*must be an async function"),
        ("@phase(timeout=-1)\nasync def t(): pass\n", r"phase 't': timeout must be a positive number"),
    ],
)
def test_product_file_errors_name_the_file(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ProductError, match=message) as info:
        load_product(write(tmp_path, body))
    assert "\n" not in str(info.value)


def test_missing_product_file(tmp_path: Path) -> None:
    with pytest.raises(ProductError, match="no such product file"):
        load_product(tmp_path / "nope.py")


def test_graph_errors_name_the_phase() -> None:
    a = phase(noop, name="a")
    b = phase(noop, name="b", after=["a"])
    with pytest.raises(ProductError, match="phase 'a': the name is used twice"):
        validate_product(Product("p", [a, a]))
    with pytest.raises(ProductError, match="phase 'b': depends on unknown phase 'a'"):
        validate_product(Product("p", [b]))
    c1 = phase(noop, name="c1", after=["c3"])
    c2 = phase(noop, name="c2", after=["c1"])
    c3 = phase(noop, name="c3", after=["c2"])
    with pytest.raises(ProductError, match=r"dependency cycle c1 -> c3 -> c2 -> c1"):
        validate_product(Product("p", [c1, c2, c3]))
    td = phase(noop, name="td", teardown=True, after=["a"])
    with pytest.raises(ProductError, match="phase 'td': a teardown cannot depend on 'a'"):
        validate_product(Product("p", [a, td]))
    first_td = phase(noop, name="first_td", teardown=True)
    second_td = phase(noop, name="second_td", teardown=True, after=[first_td])
    with pytest.raises(ProductError, match="phase 'second_td': a teardown cannot depend on 'first_td'; teardowns run"):
        validate_product(Product("p", [a, first_td, second_td]))
    after_td = phase(noop, name="after_td", after=[first_td])
    with pytest.raises(ProductError, match="phase 'after_td': a main phase cannot depend on 'first_td'"):
        validate_product(Product("p", [a, first_td, after_td]))


def test_missing_fixture_and_resource_are_named() -> None:
    async def needs_dmm(ctx, dmm) -> None:
        pass

    p = phase(needs_dmm)
    with pytest.raises(ProductError, match="phase 'needs_dmm': needs fixture 'dmm', which neither"):
        validate_product(Product("p", [p]))
    validate_product(Product("p", [p]), station_fixtures=["dmm"])
    with pytest.raises(ProductError, match="needs station resource 'shield_box'"):
        validate_product(Product("p", [phase(noop)], resources=["shield_box"]), station_resources=[])


def test_limits_file_overrides_and_is_hashed(tmp_path: Path) -> None:
    src = write(tmp_path, GOOD)
    limits = tmp_path / "prod.limits.toml"
    limits.write_text("[rails]\nvdd = { low = 3.25, high = 3.35, marginal_low = 3.27 }\n")
    loaded = load_product(src)
    assert loaded.limits_file == limits
    assert loaded.limits_sha256 == hashlib.sha256(limits.read_bytes()).hexdigest()
    assert loaded.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    m = loaded.product.phase("rails").measurement("vdd")
    assert m.limits.low == 3.25 and m.limits.high == 3.35 and m.limits.marginal_low == 3.27
    assert len(m.validators) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("[rails\n", r"bad TOML"),
        ("[rails]\nvdd = { low = 3.5, high = 3.4 }\n", r"\[rails\] vdd: in_range low 3.5 is greater than high 3.4"),
        ("[nope]\nvdd = { low = 1 }\n", r"\[nope\]: product 'widget' has no such phase"),
        ("[rails]\nvbat = { low = 1 }\n", r"\[rails\] vbat: phase 'rails' declares no such measurement"),
        ("[rails]\nvdd = { lo = 1 }\n", r"\[rails\] vdd: unknown key 'lo'"),
        ("[rails]\nvdd = { low = 'one' }\n", r"\[rails\] vdd: low must be a number"),
        ("[rails]\nvdd = 3\n", r"expected an inline table"),
        ("[rails]\nfw = { low = 1, high = 2 }\n", r"\[rails\] fw: the measurement is judged by equals, not a range"),
        ("[rails]\nvdd = { low = 1e400 }\n", r"\[rails\] vdd: "),  # inf: not a limit
        ("[rails]\nvdd = { low = 99999999999999999999999999999999 }\n", r"\[rails\] vdd: "),
    ],
)
def test_bad_limits_files(tmp_path: Path, text: str, message: str) -> None:
    src = write(tmp_path, GOOD)
    (tmp_path / "prod.limits.toml").write_text(text)
    with pytest.raises(ProductError, match=message) as info:
        load_product(src)
    assert str(tmp_path / "prod.limits.toml") in str(info.value)


def test_explicit_limits_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ProductError, match="cannot read limits file"):
        load_product(write(tmp_path, GOOD), limits=tmp_path / "missing.toml")


def test_phase_and_product_options_are_checked_when_declared() -> None:
    @phase
    async def a() -> None:
        pass

    @phase
    async def bb() -> None:
        pass

    assert phase(noop, name="c", after="bb").after == ("bb",)  # one name, not its letters
    assert phase(noop, name="c", after=bb).after == ("bb",)
    with pytest.raises(TypeError, match="phase 'c': after must be phases or their names, got 5"):
        phase(noop, name="c", after=[5])
    with pytest.raises(TypeError, match="phase 'c': run_if must be a function"):
        phase(noop, name="c", run_if=5)
    with pytest.raises(TypeError, match="phase 'c': teardown must be True or False"):
        phase(noop, name="c", teardown="yes")
    # configured() checks what @phase checks
    with pytest.raises(ValueError, match="phase 'bad name!': name must start with a letter"):
        a.configured(name="bad name!")
    with pytest.raises(ValueError, match="phase 'a': retries must be a whole number >= 0, got -5"):
        a.configured(retries=-5)
    with pytest.raises(ValueError, match="phase 'a': timeout must be a positive number"):
        a.configured(timeout=-1)
    with pytest.raises(TypeError, match="phase 'a': configured\\(\\) takes .*, not colour"):
        a.configured(colour="red")
    assert a.configured(timeout=5, retries=2).timeout == 5
    for bad, message in [
        (Product("p", [a], fixtures={"dut": 5}), "fixture 'dut' must be a factory"),
        (Product("p", [a], stop_on_failure="no"), "stop_on_failure must be True or False, got 'no'"),
        (Product("p", [a], resources=["dmm", 5]), "resources are instrument names"),
        (Product("p", [a], identity=()), "identity must name distinct dut keys"),
        (Product("p", [a], identity=("mac", "mac")), "identity must name distinct dut keys"),
        (Product("p", [a], identity=("serial", "")), "identity must name distinct dut keys"),
    ]:
        with pytest.raises(ProductError, match=message):
            validate_product(bad)


def test_measurement_declared_twice_is_rejected() -> None:
    with pytest.raises(ValueError, match="measurement 'x' is declared twice"):
        phase(noop, name="p", measurements=[Measurement("x"), Measurement("x")])


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_product_hash_covers_every_module_it_imports_from_its_own_folder(tmp_path: Path) -> None:
    # Unique module names: a module another test imported would stay in sys.modules.
    tag = uuid.uuid4().hex[:8]
    _write_tree(tmp_path, {
        "board.py": f"""
            import importlib
            from sequencer import Measurement, Product, phase
            from fx_{tag} import jig_limit
            importlib.import_module("late_{tag}")

            @phase(measurements=[Measurement("v").in_range(0, jig_limit())])
            async def measure(ctx):
                ctx.measurements.v = 5

            product = Product("board", [measure])
        """,
        f"fx_{tag}.py": f"from lib_{tag}.numbers import LIMIT\ndef jig_limit():\n    return LIMIT\n",
        f"lib_{tag}/__init__.py": "",
        f"lib_{tag}/numbers.py": "LIMIT = 1\n",
        f"late_{tag}.py": "",
        "unrelated.py": "",  # beside the product, never imported: not its code
    })
    loaded = load_product(tmp_path / "board.py")
    files = {f.path: f.sha256 for f in loaded.source_files}
    assert list(files) == ["board.py", f"fx_{tag}.py", f"late_{tag}.py", f"lib_{tag}/__init__.py",
                           f"lib_{tag}/numbers.py"]
    for path, digest in files.items():
        assert digest == hashlib.sha256((tmp_path / path).read_bytes()).hexdigest()
    manifest = "".join(f"{files[p]}  {p}\n" for p in sorted(files))
    assert loaded.source_sha256 == hashlib.sha256(manifest.encode()).hexdigest()  # as `sha256sum ... | sha256sum`
    before = loaded.source_sha256

    # The edit the issue describes: a limit in the product's own helper module turns FAIL into PASS.
    (tmp_path / f"lib_{tag}" / "numbers.py").write_text("LIMIT = 10\n")
    assert load_product(tmp_path / "board.py").source_sha256 != before


async def test_every_run_record_names_the_products_code(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    _write_tree(tmp_path / "line", {
        "board.py": f"""
            from sequencer import Product
            from steps_{tag} import measure
            product = Product("board", [measure])
        """,
        f"steps_{tag}.py": """
            from sequencer import phase
            @phase
            async def measure():
                pass
        """,
    })
    loaded = load_product(tmp_path / "line" / "board.py")
    store = LocalStore.open(tmp_path / "store.sqlite", station=True)
    try:
        async with store.writer():
            result = await run_station(loaded, ["/dev/x"], settings=RunSettings(station="st"), store=store,
                                       bus=EventBus(), handle_signals=False)
        [run] = result.runs
        stored = store.get_run(run.run_id)
    finally:
        store.close()
    assert stored.product_sha256 == loaded.source_sha256
    assert [f.path for f in stored.product_files] == ["board.py", f"steps_{tag}.py"]


def test_a_product_inside_a_package_names_its_files_from_the_top_package(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    _write_tree(tmp_path, {
        f"pkg_{tag}/__init__.py": "",
        f"pkg_{tag}/board.py": f"""
            from sequencer import Product
            from pkg_{tag}.steps import measure
            product = Product("board", [measure])
        """,
        f"pkg_{tag}/steps.py": "from sequencer import phase\n@phase\nasync def measure():\n    pass\n",
    })
    loaded = load_product(tmp_path / f"pkg_{tag}" / "board.py")
    assert [f.path for f in loaded.source_files] == ["board.py", "__init__.py", "steps.py"]


def test_a_product_of_one_file_keeps_its_files_hash(tmp_path: Path) -> None:
    src = write(tmp_path, GOOD)
    loaded = load_product(src)
    assert [f.path for f in loaded.source_files] == ["prod.py"]
    assert loaded.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
