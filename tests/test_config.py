import pytest
import torch

from optgptq_compile.config import OptGPTQConfig, parse_options


def test_defaults_match_design():
    cfg = parse_options(None)
    assert (cfg.bits, cfg.group_size, cfg.act_order, cfg.sym) == (4, 128, True, True)
    assert (cfg.calibration, cfg.kv_heads, cfg.block_size, cfg.kernels, cfg.dump_dir) == (None, None, 16, "auto", None)


@pytest.mark.parametrize(
    "key,value",
    [
        ("bits", 5),  # not a supported width
        ("bits", True),  # bool is an int subclass: must not pass as 1
        ("group_size", 0),
        ("group_size", -2),
        ("act_order", 1),
        ("kv_heads", 0),
        ("block_size", 24),  # not a power of two
        ("kernels", "cuda"),
        ("calibration", torch.randn(2, 8)),  # float, not token ids
        ("calibration", torch.randint(0, 9, (8,))),  # 1-D
        ("calibration", "some text"),
        ("damp_percent", 0.0),
    ],
)
def test_bad_values_name_the_key_and_accepted_values(key, value):
    with pytest.raises(ValueError, match=key) as info:
        parse_options({key: value})
    assert "expected" in str(info.value)


def test_unknown_key_lists_accepted_keys():
    with pytest.raises(ValueError, match=r"unknown optgptq option\(s\) \['bitz'\].*group_size"):
        parse_options({"bitz": 4})


def test_valid_values_accepted():
    cfg = parse_options({"bits": None, "group_size": -1, "calibration": torch.randint(0, 9, (2, 8)), "kv_heads": 1})
    assert cfg.bits is None and cfg.group_size == -1 and cfg.kv_heads == 1
    assert parse_options({"calibration": [torch.randint(0, 9, (1, 8))]}).calibration is not None


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTGPTQ_DUMP_DIR", str(tmp_path))
    assert parse_options({}).dump_dir == str(tmp_path)
    assert parse_options({"dump_dir": "elsewhere"}).dump_dir == "elsewhere"  # the option wins


def test_quant_key_separates_settings_that_change_the_weights():
    assert OptGPTQConfig(bits=4).quant_key() != OptGPTQConfig(bits=8).quant_key()
    assert OptGPTQConfig(group_size=32).quant_key() != OptGPTQConfig(group_size=128).quant_key()
    assert OptGPTQConfig(kernels="reference").quant_key() == OptGPTQConfig(kernels="auto").quant_key()
