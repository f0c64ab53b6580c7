"""Which precision and runtime serve each tower (HQCLIP_PRECISION / HQCLIP_BACKEND, auto by default), what the
processor is said to compute natively, and the settings that steer both."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from hqclip.jobs.precision import EmulatedPrecision, check_native
from hqclip.repo.manifest import Variant, load_manifest
from services.backends import choose_precision, create_backend
from services.backends.cpu import Cpu, parse_cpuinfo, this_cpu
from services.settings import Settings
from testkit.processes import ROOT

# The first lines that matter of three real /proc/cpuinfo texts: this kind of box (AVX-512 + VNNI, no bf16 units),
# a Sapphire Rapids (AMX), an Arm Neoverse N1 (int8 dot product).
XEON_VNNI = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Processor @ 2.80GHz
flags		: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_vbmi2
"""
SAPPHIRE_RAPIDS = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
NEOVERSE = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
"""
AVX2_ONLY = "model name	: Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz\nflags		: fpu sse avx avx2 fma\n"


def cpu(text: str) -> Cpu:
    return Cpu(*parse_cpuinfo(text))


def test_cpu_flags_say_what_is_native():
    xeon, spr, arm, old = cpu(XEON_VNNI), cpu(SAPPHIRE_RAPIDS), cpu(NEOVERSE), cpu(AVX2_ONLY)
    assert xeon.model == "Intel(R) Xeon(R) Processor @ 2.80GHz"
    assert (xeon.bf16_native, xeon.int8_native) == (False, True)
    assert (spr.bf16_native, spr.int8_native) == (True, True)
    assert (arm.bf16_native, arm.int8_native) == (False, True)
    assert (old.bf16_native, old.int8_native) == (False, False)
    assert "avx512_bf16 no, AMX no, VNNI yes" in xeon.summary()
    assert "avx512_bf16 yes, AMX yes, VNNI yes" in spr.summary()
    # OpenVINO's own report counts too: it lists BF16 only where the matrix units compute it
    assert Cpu(xeon.model, xeon.flags, ("FP32", "BF16", "INT8")).bf16_native


def test_this_cpu_is_read_from_the_machine():
    here = this_cpu()
    assert here.model and here.flags and here.summary().startswith(here.model)
    assert "FP32" in here.openvino  # OpenVINO is a serving dependency


@pytest.fixture(scope="module")
def manifest(tiny_repo):
    """The tiny model's manifest as if bf16 and int8 variants had passed their gates."""
    base = load_manifest(tiny_repo, "tiny")
    return base.model_copy(update={"variants": {
        "bf16": Variant(image_model="tiny_image_bf16", text_model="tiny_text_bf16", runtime="openvino"),
        "int8": Variant(image_model="tiny_image_int8", text_model="tiny_text_int8"),
    }})


def test_auto_precision_is_the_fastest_variant_the_cpu_computes_natively(manifest):
    assert choose_precision("auto", manifest, cpu(SAPPHIRE_RAPIDS), False)[0] == "bf16"
    precision, why = choose_precision("auto", manifest, cpu(XEON_VNNI), False)
    assert precision == "int8" and "bf16 (emulated here: no AVX512-BF16 or AMX-BF16)" in why
    assert choose_precision("auto", manifest, cpu(AVX2_ONLY), False)[0] == "fp32"
    no_variants = manifest.model_copy(update={"variants": {}})
    assert choose_precision("auto", no_variants, cpu(SAPPHIRE_RAPIDS), False)[0] == "fp32"


def test_an_explicit_emulated_precision_is_refused_or_served_with_a_warning(manifest, caplog):
    with pytest.raises(EmulatedPrecision) as refused:
        choose_precision("bf16", manifest, cpu(XEON_VNNI), allow_emulated=False)
    message = str(refused.value)
    assert "HQCLIP_PRECISION=bf16" in message and "40x slower" in message
    assert "HQCLIP_ALLOW_EMULATED=true" in message and "HQCLIP_PRECISION=auto" in message
    with caplog.at_level("WARNING", logger="hqclip.backends"):
        precision, why = choose_precision("bf16", manifest, cpu(XEON_VNNI), allow_emulated=True)
    assert precision == "bf16" and "EMULATED" in why
    assert "40x slower" in caplog.text
    assert choose_precision("bf16", manifest, cpu(SAPPHIRE_RAPIDS), False) == ("bf16", "HQCLIP_PRECISION=bf16")
    with pytest.raises(ValueError, match="hqclip export --precision int8"):
        choose_precision("int8", manifest.model_copy(update={"variants": {}}), cpu(XEON_VNNI), False)


def test_auto_backend_measures_both_runtimes_per_tower_and_says_so(tiny_repo):
    settings = Settings(model_repo=tiny_repo, model="tiny")
    backend = create_backend(settings, load_manifest(tiny_repo, "tiny"))
    choice = backend.choice
    assert backend.precision == choice["precision"] == "fp32"  # the tiny repository has no variants
    assert set(choice["towers"]) == {"image", "text"}
    for tower in choice["towers"].values():
        assert tower["runtime"] in ("onnxruntime", "openvino")
        assert "measured at start" in tower["why"] and "onnxruntime" in tower["why"] and "openvino" in tower["why"]
    assert backend.name in ("onnxruntime", "openvino", "onnxruntime+openvino", "openvino+onnxruntime")

    told = create_backend(Settings(model_repo=tiny_repo, model="tiny", backend="onnxruntime"),
                          load_manifest(tiny_repo, "tiny"))
    assert told.name == "onnxruntime"
    assert {t["why"] for t in told.choice["towers"].values()} == {"HQCLIP_BACKEND=onnxruntime"}


def test_settings_are_validated_and_text_batches_named_like_image_ones(monkeypatch, caplog):
    monkeypatch.setenv("HQCLIP_PRECISION", "int4")
    with pytest.raises(ValidationError) as invalid:
        Settings()
    assert "precision" in str(invalid.value) and "'auto', 'fp32', 'bf16' or 'int8'" in str(invalid.value)
    monkeypatch.setenv("HQCLIP_PRECISION", "auto")
    monkeypatch.setenv("HQCLIP_BATCH__TEXT_MAX_SIZE", "48")
    monkeypatch.setenv("HQCLIP_BATCH__TEXT_WORKERS", "2")
    assert (Settings().batch.text_max_size, Settings().batch.text_workers) == (48, 2)
    for name in ("HQCLIP_BATCH__TEXT_MAX_SIZE", "HQCLIP_BATCH__TEXT_WORKERS"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HQCLIP_BATCH__MAX_SIZE", "64")  # the old names still work, with a warning
    monkeypatch.setenv("HQCLIP_BATCH__WORKERS", "3")
    with caplog.at_level("WARNING", logger="hqclip.settings"):
        batch = Settings().batch
    assert (batch.text_max_size, batch.text_workers) == (64, 3)
    assert "HQCLIP_BATCH__MAX_SIZE is deprecated: use HQCLIP_BATCH__TEXT_MAX_SIZE" in caplog.text


def test_export_says_before_it_starts_that_the_cpu_would_emulate(tmp_path):
    with pytest.raises(EmulatedPrecision, match="pass --force to gate it here on 32 images"):
        check_native("bf16", force=False, cpu=cpu(XEON_VNNI))
    assert "emulated here" in check_native("bf16", force=True, cpu=cpu(XEON_VNNI))
    assert check_native("bf16", force=False, cpu=cpu(SAPPHIRE_RAPIDS)) is None
    # the real command on this machine: refused at once, before any export, when bf16 is emulated here
    result = subprocess.run([sys.executable, "-m", "hqclip.cli", "export", "--out", str(tmp_path),
                             "--precision", "bf16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if this_cpu().bf16_native:
        assert "emulated" not in result.stderr
    else:
        assert result.returncode == 2, result.stderr
        assert "no AVX512-BF16 or AMX-BF16" in result.stderr and "--force" in result.stderr
        assert not any(tmp_path.iterdir())


def test_every_benchmark_section_names_its_processor(capsys):
    from benchmarks.results import publish

    publish(["### A benchmark", "", "| a | b |"], keep=False)
    title, blank, machine, *rest = capsys.readouterr().out.splitlines()
    assert (title, blank, rest) == ("### A benchmark", "", ["", "| a | b |"])
    assert machine.startswith(f"CPU: {this_cpu().model}") and "avx512_bf16" in machine and "AMX" in machine
    assert "VNNI" in machine and "load average" in machine
