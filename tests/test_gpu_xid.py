"""The XID table in config/xid_codes.toml and its loader."""

from __future__ import annotations

import pytest

from supervisor.gpu.errors import XidTableError
from supervisor.gpu.model import Severity
from supervisor.gpu.xid import default_table_path, load_xid_table

CRITICAL = {48, 63, 64, 79, 94, 95, 119, 120}
LISTED = {13, 31, 32, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120, 121, 122, 123, 140}


def test_packaged_table_has_the_well_known_xids():
    table = load_xid_table()
    assert default_table_path().name == "xid_codes.toml"
    assert LISTED <= {code for code in range(200) if code in table}
    for code in CRITICAL:
        assert table.lookup(code).severity is Severity.CRITICAL, code
    for code in (13, 31, 43, 45, 68, 74, 92):
        assert table.lookup(code).severity is not Severity.CRITICAL, code
    assert table.lookup(79).meaning == "GPU has fallen off the bus"
    assert table.lookup(48).meaning == "Double-bit ECC error"


def test_unknown_xid_is_a_warning():
    info = load_xid_table().lookup(9999)
    assert (info.code, info.meaning, info.severity) == (9999, "unknown XID", Severity.WARNING)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[xid.x1]\nmeaning = "a"\nseverity = "info"\n', "xid.x1: the key must be an XID number"),
        ('[xid.5]\nseverity = "info"\n', "xid.5: 'meaning' must be a non-empty string"),
        ('[xid.5]\nmeaning = "a"\nseverity = "fatal"\n', "xid.5: 'severity' must be one of info, warning, critical"),
        ('[xid.5\n', "Expected"),
    ],
)
def test_malformed_tables_name_the_entry(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(XidTableError, match=message):
        load_xid_table(path)


def test_custom_table(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[xid.999]\nmeaning = "lab test"\nseverity = "critical"\n')
    table = load_xid_table(path)
    assert len(table) == 1 and table.lookup(999).severity is Severity.CRITICAL
