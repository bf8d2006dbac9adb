"""Profiles: the packaged set, the schema's errors, a user's file, detection on this machine."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from rotary_gguf.cli import main
from rotary_gguf.profile import ProfileError, detect_profile, load_profile, parse_size, profile_names

REQUIRED = {"rtx4060-laptop-8gb", "rtx3050-laptop-4gb", "rtx3060-12gb", "rtx4070-laptop-8gb", "rtx4090-24gb",
            "h100-80gb", "cpu-only"}


def test_packaged_profiles_load():
    assert REQUIRED <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert p.vram_budget_bytes <= p.vram_total_bytes
        assert p.ubatch <= p.batch
    laptop = load_profile("rtx4060-laptop-8gb")
    assert 6.3 * 2**30 <= laptop.vram_budget_bytes <= 6.5 * 2**30
    assert load_profile("rtx3060-12gb").vram_budget_bytes == int(0.85 * 12 * 2**30)
    assert not load_profile("cpu-only").has_gpu


def _write(tmp_path, **changes):
    data = yaml.safe_load(open(load_profile("rtx4060-laptop-8gb").source))
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"vram_budjet": "6GiB"}, "unknown key 'vram_budjet'"),
    ({"ctx": -5}, "key 'ctx': expected a positive integer"),
    ({"kv_cache_type": "q3"}, "key 'kv_cache_type': expected one of"),
    ({"vram_budget": "lots"}, "key 'vram_budget': vram_budget: expected a size"),
    ({"vram_budget": "9GiB"}, "more than the GPU's 8.00 GiB"),
    ({"bandwidth": {"gpu_memory_gbs": 1, "host_ram_gbs": 1}}, "missing key 'pcie_gbs'"),
    ({"flash_attention": "yes"}, "key 'flash_attention': expected true or false"),
    ({"description": None}, "missing key 'description'"),
    ({"rotation_policy": "fifo"}, "key 'rotation_policy': 'fifo' is not one of lru, lfu, hybrid"),
])
def test_schema_errors_name_file_and_key(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_user_profile_by_path(tmp_path):
    path = _write(tmp_path, vram_budget=0.5, ctx=2048)
    p = load_profile(str(path))
    assert p.name == "mine" and p.ctx == 2048 and p.vram_budget_bytes == 4 * 2**30


def test_bad_yaml_and_missing_profile(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ctx: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(str(bad))
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(str(tmp_path / "none.yaml"))
    with pytest.raises(ProfileError, match="unknown profile 'rtx9090'; known: cpu-only"):
        load_profile("rtx9090")


def test_parse_size():
    assert parse_size("6GiB") == 6 * 2**30
    assert parse_size("6.5 GiB") == int(6.5 * 2**30)
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size(1024) == 1024
    for bad in ("6 gigs", "-1GiB", "", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_detect_names_what_this_machine_has():
    """Detection on the real machine, whichever it is: a GPU gets a GPU profile named after it, none gets cpu-only."""
    detection = detect_profile()
    result = CliRunner().invoke(main, ["profiles", "detect"])
    assert result.exit_code == 0 and f"profile        {detection.profile.name}: " in result.stdout
    if detection.gpu_name is None:
        assert detection.profile.name == "cpu-only" and detection.reason.startswith("no NVIDIA GPU")
        assert "GPU            none" in result.stdout and "no NVIDIA GPU" in result.stdout
    else:
        assert detection.profile.has_gpu and detection.gpu_name in detection.reason
        assert detection.profile.vram_total_bytes <= detection.vram_total_bytes * 1.05
        assert f"GPU            {detection.gpu_name}" in result.stdout


@pytest.mark.parametrize("gpu, profile, reason", [
    ("NVML reports no GPU", "cpu-only", "no NVIDIA GPU: NVML reports no GPU; using cpu-only"),
    (("NVIDIA GeForce RTX 4060 Laptop GPU", 8 * 2**30, 7 * 2**30), "rtx4060-laptop-8gb", "matches profile rtx4060"),
    (("NVIDIA Mystery 40GB", 40 * 2**30, 39 * 2**30), "detected", "matches no packaged profile; using 85% of its 40.0"),
])
def test_detect_picks_the_profile_for_what_nvml_reports(monkeypatch, gpu, profile, reason):
    """Each branch of detection, on any machine: NVML's answer stands in for the hardware."""
    from rotary_gguf import profile as profile_module

    monkeypatch.setattr(profile_module, "_nvml_gpu", lambda: gpu)
    detection = detect_profile()
    assert detection.profile.name == profile and reason in detection.reason
    assert detection.gpu_name == (None if isinstance(gpu, str) else gpu[0])
    result = CliRunner().invoke(main, ["profiles", "detect"])
    assert result.exit_code == 0 and f"profile        {profile}: " in result.stdout and reason in result.stdout
    if profile == "detected":
        assert detection.profile.vram_budget_bytes == int(0.85 * 40 * 2**30)


def test_profiles_commands():
    runner = CliRunner()
    listed = runner.invoke(main, ["profiles", "list"])
    assert listed.exit_code == 0 and all(name in listed.stdout for name in REQUIRED)
    shown = runner.invoke(main, ["profiles", "show", "rtx4060-laptop-8gb"])
    assert shown.exit_code == 0 and "6.40 GiB" in shown.stdout and "PCIe 12 GB/s" in shown.stdout
    missing = runner.invoke(main, ["profiles", "show", "nope"])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1
