"""The catalog: --model specs, TOML files, prices and the billing formula."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.api import ChatMessage
from coordinator.catalog import (
    MAX_PRICE_PER_MTOK,
    Catalog,
    CatalogEntry,
    CatalogError,
    catalog_from_specs,
    load_catalog,
    price_per_mtok,
    request_cost,
)
from coordinator.errors import ModelNotFoundError
from coordinator.verification.judge import Thresholds
from miner.test_model import create_test_model
from proto.weights_digest import weights_sha256
from tests.coordinator_text import qwen_style_dir

PRICES = {"input_price_per_mtok": 100_000, "output_price_per_mtok": 300_000}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_test_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def entry(model_dir: Path) -> CatalogEntry:
    return catalog_from_specs([f"tiny={model_dir}"], **PRICES).get("tiny")


# --- --model NAME=DIR ---------------------------------------------------------------------------


def test_specs_build_entries(model_dir: Path, tmp_path: Path) -> None:
    other = qwen_style_dir(tmp_path / "qwen")
    shutil.copy(model_dir / "model.safetensors", other / "model.safetensors")
    catalog = catalog_from_specs([f"tiny={model_dir}", f"org/qwen:0.5b={other}"], **PRICES)
    assert catalog.names() == ["tiny", "org/qwen:0.5b"]
    assert len(catalog) == 2 and list(catalog) == catalog.names()
    assert "tiny" in catalog and "nope" not in catalog
    tiny = catalog.get("tiny")
    assert tiny.weights_sha256 == weights_sha256(model_dir)
    assert len(tiny.weights_sha256) == 32
    assert tiny.model_dir == model_dir
    assert (tiny.input_price_per_mtok, tiny.output_price_per_mtok) == (100_000, 300_000)
    assert tiny.context_length == tiny.tokenizer.context_length == 512
    assert tiny.tokenizer.name == "tiny"
    qwen = catalog.get("org/qwen:0.5b")
    assert qwen.context_length == 4096
    # The digest covers the weight files' names and bytes, not where the directory is.
    assert qwen.weights_sha256 == tiny.weights_sha256
    assert [entry.name for entry in catalog.entries()] == catalog.names()


def test_unknown_model(entry: CatalogEntry) -> None:
    catalog = Catalog([entry])
    with pytest.raises(ModelNotFoundError, match="model 'gpt-5' does not exist"):
        catalog.get("gpt-5")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiny", "expected NAME=DIR"),
        ("tiny=", "expected NAME=DIR"),
        ("=DIR", "name: '' must be 1-64"),
        ("bad name=DIR", "name: 'bad name' must be 1-64"),
        ("é=DIR", "must be 1-64"),
        ("a" * 65 + "=DIR", "must be 1-64"),
    ],
)
def test_bad_specs(model_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        catalog_from_specs([spec.replace("DIR", str(model_dir))], **PRICES)


def test_spec_errors_from_the_directory(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"--model 'x=.*absent'.*path: .*not a directory"):
        catalog_from_specs([f"x={tmp_path / 'absent'}"], **PRICES)
    no_weights = qwen_style_dir(tmp_path / "qwen")
    with pytest.raises(CatalogError, match=r"cannot hash the weights.*give weights_sha256"):
        catalog_from_specs([f"x={no_weights}"], **PRICES)
    with pytest.raises(CatalogError, match="'tiny' is listed twice"):
        catalog_from_specs([f"tiny={model_dir}", f"tiny={model_dir}"], **PRICES)
    with pytest.raises(CatalogError, match="no models"):
        catalog_from_specs([], **PRICES)
    with pytest.raises(CatalogError, match="price -1"):
        catalog_from_specs([f"tiny={model_dir}"], input_price_per_mtok=-1, output_price_per_mtok=0)


# --- TOML ---------------------------------------------------------------------------------------


def test_toml_catalog(model_dir: Path, tmp_path: Path) -> None:
    hashless = qwen_style_dir(tmp_path / "models" / "qwen")  # tokenizer files, no weights
    explicit = "ab" * 32
    path = tmp_path / "catalog.toml"
    path.write_text(
        f"""
[[models]]
name = "qwen2.5-0.5b-instruct"
path = "models/qwen"                 # relative to this file
weights_sha256 = "{explicit.upper()}"
input_price_per_million = "0.10"
output_price_per_million = 0.3
context_length = 2048

[[models]]
name = "tiny"
path = "{model_dir}"
input_price_per_million = 2
output_price_per_million = "0.000001"
"""
    )
    catalog = load_catalog(path)
    qwen = catalog.get("qwen2.5-0.5b-instruct")
    assert qwen.model_dir == hashless
    assert qwen.weights_sha256 == bytes.fromhex(explicit)  # taken as given: nothing to hash
    assert (qwen.input_price_per_mtok, qwen.output_price_per_mtok) == (100_000, 300_000)
    assert qwen.context_length == 2048
    assert qwen.tokenizer.context_length == 4096
    tiny = catalog.get("tiny")
    assert tiny.weights_sha256 == weights_sha256(model_dir)
    assert (tiny.input_price_per_mtok, tiny.output_price_per_mtok) == (2_000_000, 1)
    assert tiny.context_length == 512
    assert tiny.verification == Thresholds()  # no [models.verification]: the calibrated defaults


def test_toml_verification_thresholds_override_the_defaults(
    model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        GOOD_ENTRY.replace("MODEL", str(model_dir))
        + "[models.verification]\nmax_mean_abs_dlogprob = 0.05\npooled_min_tokens = 100\n"
    )
    thresholds = load_catalog(path).get("m").verification
    assert thresholds.max_mean_abs_dlogprob == 0.05 and thresholds.pooled_min_tokens == 100
    assert thresholds.margin_limit == Thresholds().margin_limit


GOOD_ENTRY = """
[[models]]
name = "m"
path = "MODEL"
input_price_per_million = "1"
output_price_per_million = "2"
"""


def edited(change: Callable[[str], str]) -> Callable[[Path], str]:
    return lambda model_dir: change(GOOD_ENTRY.replace("MODEL", str(model_dir)))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (edited(lambda s: s + "[oops\n"), "invalid TOML"),
        (edited(lambda s: "title = 'x'\n" + s), "unknown top-level keys \\['title'\\]"),
        (lambda _: "", "no \\[\\[models\\]\\] entries"),
        (lambda _: "models = 3", "no \\[\\[models\\]\\] entries"),
        (lambda _: "models = [1]", "models\\[0\\]: expected a table"),
        (edited(lambda s: s.replace('name = "m"', "")), "models\\[0\\]: name: required"),
        (edited(lambda s: s.replace('"m"', '"a b"')), "models\\[0\\]: name: 'a b' must be"),
        (edited(lambda s: s + "input_price = 1\n"), "\\('m'\\): input_price: unknown field"),
        (edited(lambda s: s.replace('path = "', 'paht = "')), "\\('m'\\): paht: unknown field"),
        (
            edited(lambda s: s.replace('output_price_per_million = "2"', "")),
            "output_price_per_million: required",
        ),
        (edited(lambda s: s.replace('"1"', '"-1"')), "input_price_per_million: .*non-negative"),
        (edited(lambda s: s.replace('"1"', '"0.0000001"')), "at most 6 decimal places"),
        (edited(lambda s: s.replace('"1"', '"cheap"')), "'cheap' is not a decimal number"),
        (edited(lambda s: s.replace('"1"', "true")), "input_price_per_million: a price must"),
        (edited(lambda s: s.replace('"1"', '"nan"')), "finite"),
        (edited(lambda s: s.replace('"1"', "2_000_000")), "above 1000000 credits"),
        (edited(lambda s: s + 'weights_sha256 = "abc"\n'), "weights_sha256: must be 64 hex"),
        (edited(lambda s: s + f'weights_sha256 = "{"zz" * 32}"\n'), "weights_sha256: must be"),
        (edited(lambda s: s + "weights_sha256 = 12\n"), "weights_sha256: must be a string"),
        (edited(lambda s: s + "context_length = 0\n"), "context_length: must be a positive"),
        (edited(lambda s: s + 'context_length = "1k"\n'), "context_length: must be a positive"),
        (edited(lambda s: s + "context_length = 100000\n"), "context_length: 100000 exceeds .*512"),
        (edited(lambda s: s + s), "models\\[1\\] \\('m'\\): name: listed twice"),
        (edited(lambda s: s.replace('path = "', 'path = "/absent')), "\\('m'\\): path: .*absent"),
        (edited(lambda s: s.replace('path = "', "path = 3 #")), "\\('m'\\): path: required"),
        (edited(lambda s: s + "verification = 3\n"), "verification: must be a table"),
        (
            edited(lambda s: s + "[models.verification]\nmargin = 1.0\n"),
            "verification.margin: unknown",
        ),
        (
            edited(lambda s: s + "[models.verification]\npooled_min_tokens = 1.5\n"),
            "verification.pooled_min_tokens: must be an integer",
        ),
        (
            edited(lambda s: s + "[models.verification]\nmargin_limit = -1\n"),
            "verification: margin_limit must be finite and >= 0",
        ),
    ],
)
def test_toml_errors_name_file_entry_and_field(
    model_dir: Path, tmp_path: Path, document: Callable[[Path], str], message: str
) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(document(model_dir))
    with pytest.raises(CatalogError, match=message) as raised:
        load_catalog(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"absent\.toml: cannot read"):
        load_catalog(tmp_path / "absent.toml")


# --- GGUF files ---------------------------------------------------------------------------------


def test_gguf_spec(smollm2_gguf: Path) -> None:
    smol = catalog_from_specs([f"smol={smollm2_gguf}"], **PRICES).get("smol")
    assert smol.weights_sha256 == weights_sha256(smollm2_gguf)  # the file's digest
    assert smol.model_dir == smollm2_gguf
    assert smol.context_length == smol.tokenizer.context_length == 8192
    assert smol.tokenizer.name == "smol"
    ids = smol.tokenizer.encode_chat([ChatMessage(role="user", content="hi")])
    assert ids[0] == 1 and smol.tokenizer.decode(ids).endswith("user\nhi\nassistant\n")


def test_gguf_in_a_toml_catalog(smollm2_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smol.gguf").symlink_to(smollm2_gguf)
    path = tmp_path / "catalog.toml"
    path.write_text(
        GOOD_ENTRY.replace("MODEL", "models/smol.gguf")
        + f'weights_sha256 = "{"cd" * 32}"\ncontext_length = 4096\n'
    )
    entry = load_catalog(path).get("m")
    assert entry.model_dir == tmp_path / "models" / "smol.gguf"
    assert entry.weights_sha256 == bytes.fromhex("cd" * 32)
    assert entry.context_length == 4096 and entry.tokenizer.context_length == 8192


def test_missing_or_truncated_gguf(smollm2_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"--model 'x=.*absent\.gguf'.*path: .*cannot read"):
        catalog_from_specs([f"x={tmp_path / 'absent.gguf'}"], **PRICES)
    truncated = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    with pytest.raises(CatalogError, match=r"path: .*cut\.gguf: truncated"):
        catalog_from_specs([f"x={truncated}"], **PRICES)
    path = tmp_path / "catalog.toml"
    path.write_text(GOOD_ENTRY.replace("MODEL", "cut.gguf"))
    with pytest.raises(CatalogError, match=r"\('m'\): path: .*cut\.gguf: truncated"):
        load_catalog(path)


# --- prices and the billing formula -------------------------------------------------------------


@given(micro=st.integers(min_value=0, max_value=MAX_PRICE_PER_MTOK))
def test_prices_round_trip_exactly(micro: int) -> None:
    credits = Decimal(micro) / 1_000_000
    assert price_per_mtok(str(credits)) == micro
    assert price_per_mtok(f"{credits:f}") == micro
    # TOML numbers arrive as floats; up to 13 significant digits they survive exactly.
    assert price_per_mtok(float(credits)) == micro
    if micro % 1_000_000 == 0:
        assert price_per_mtok(micro // 1_000_000) == micro


@pytest.mark.parametrize(
    ("value", "expected"), [("0.1", 100_000), (0.1, 100_000), ("1e-6", 1), (" 3 ", 3_000_000)]
)
def test_price_forms(value: object, expected: int) -> None:
    assert price_per_mtok(value) == expected


@pytest.mark.parametrize(
    "value", ["-0.5", "1e-7", "0.0000005", "inf", "nan", "", None, True, [1], "1,5"]
)
def test_bad_prices(value: object) -> None:
    with pytest.raises(ValueError):
        price_per_mtok(value)


tokens = st.integers(min_value=0, max_value=10**7)
prices = st.integers(min_value=0, max_value=MAX_PRICE_PER_MTOK)


@settings(max_examples=300)
@given(
    prompt=tokens,
    completion=tokens,
    more_prompt=tokens,
    more_completion=tokens,
    input_price=prices,
    output_price=prices,
)
def test_request_cost_is_the_exact_ceiling_and_monotone(
    entry: CatalogEntry,
    prompt: int,
    completion: int,
    more_prompt: int,
    more_completion: int,
    input_price: int,
    output_price: int,
) -> None:
    priced = replace(entry, input_price_per_mtok=input_price, output_price_per_mtok=output_price)
    cost = request_cost(priced, prompt_tokens=prompt, completion_tokens=completion)
    exact = Fraction(prompt * input_price + completion * output_price, 1_000_000)
    assert cost == math.ceil(exact)
    assert cost - 1 < exact <= cost
    more = request_cost(
        priced, prompt_tokens=prompt + more_prompt, completion_tokens=completion + more_completion
    )
    assert more >= cost


def test_request_cost_rounds_up_once_per_request(entry: CatalogEntry) -> None:
    # 0.1 credit per million prompt tokens = 0.1 micro-unit per token.
    assert request_cost(entry, prompt_tokens=0, completion_tokens=0) == 0
    assert request_cost(entry, prompt_tokens=1, completion_tokens=0) == 1
    assert request_cost(entry, prompt_tokens=10, completion_tokens=0) == 1
    assert request_cost(entry, prompt_tokens=11, completion_tokens=0) == 2
    assert request_cost(entry, prompt_tokens=5, completion_tokens=5) == 2  # 0.5 + 1.5
    with pytest.raises(ValueError):
        request_cost(entry, prompt_tokens=-1, completion_tokens=0)
