"""peftjax.io.read_json: parsed values, and errors that name the file and position."""

import pytest

from peftjax import io as pio


def test_read_json_parses_and_names_the_file_in_every_error(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 64, "layers": [1, 2]}', encoding="utf-8")
    assert pio.read_json(p, "demo") == {"hidden_size": 64, "layers": [1, 2]}
    p.write_text("[1, 2]", encoding="utf-8")
    assert pio.read_json(p, "demo", want_object=False) == [1, 2]
    with pytest.raises(ValueError, match=r"demo: .*config\.json must hold a JSON object, "
                                         r"got list"):
        pio.read_json(p, "demo")
    p.write_text('{\n  "a": 1\n  "b": 2\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"load_x: .*config\.json is not valid JSON: "
                                         r"Expecting ',' delimiter at line 3, column 3"):
        pio.read_json(p, "load_x")
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"config\.json is not UTF-8 text \(byte 7\)"):
        pio.read_json(p, "demo")
