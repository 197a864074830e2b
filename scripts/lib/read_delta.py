#!/usr/bin/env python3
"""Read a Delta table with an independent implementation (delta-rs through the `deltalake`
Python package, not slotlake's own code) and print it in a canonical form that tests compare.

    read_delta.py <table-uri> [--s3-endpoint URL]     # every row of the current version
    read_delta.py <table-uri> --count                 # the number of rows
    read_delta.py <table-uri> --version               # the table version
    read_delta.py <table-uri> --files                 # the data files of the current version

Rows are printed one JSON object per line, keys in schema order, compact separators. They are
sorted by (`_lsn`, `_seq`) when the table has those columns (an `_lsn` string `X/Y` is compared
as the 64-bit LSN it stands for; nulls first); rows that tie, or all rows of a table without
them, are ordered by their rendered text, so the output never depends on file order.

Values are rendered canonically:
  integers, booleans      JSON numbers / true / false
  floats                  shortest round-trip decimal of the column's width (float32 `0.1`
                          prints as 0.1); NaN and infinities as "NaN", "Infinity", "-Infinity"
  decimals                strings with exactly the column's scale ("1.50" for decimal(p,2))
  strings                 strings
  binary                  "\\x" + lower-case hex
  dates                   "YYYY-MM-DD" (years outside 0..9999 as "+10000" / "-0001")
  timestamps              "YYYY-MM-DDTHH:MM:SS[.fraction]" with the fraction's trailing zeros
                          trimmed; zoned (Delta `timestamp`) ones in UTC with a "Z" suffix
  lists, structs, maps    arrays, objects, objects (map keys rendered, then as JSON text if
                          they are not strings)
  null                    null

s3:// tables: --s3-endpoint points at an S3-compatible server such as the tests' moto; plain
HTTP, region us-east-1 and dummy credentials are used with it (the environment's AWS_* settings
otherwise). Errors go to stderr with exit status 1.
"""

import argparse
import decimal
import json
import math
import os
import re
import struct
import sys

import pyarrow as pa
from deltalake import DeltaTable


def storage_options(uri, endpoint):
    if not endpoint or not uri.startswith(("s3://", "s3a://")):
        return None
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# --- canonical rendering -------------------------------------------------------------------


def arrow_table(dt, columns=None):
    """The table's rows as a pyarrow Table. A table with deletion vectors (slotlake compact
    --deletion-vectors) is read through delta-rs's QueryBuilder, which applies them
    (`to_pyarrow_table` refuses such tables), and cast back to the table's own schema."""
    if "deletionVectors" in (dt.protocol().reader_features or []):
        from deltalake import QueryBuilder

        cols = ", ".join('"' + c.replace('"', '""') + '"' for c in columns) if columns else "*"
        table = pa.table(QueryBuilder().register("t", dt).execute(f"SELECT {cols} FROM t"))
        schema = pa.schema(dt.schema().to_arrow())
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        return table.cast(schema)
    return dt.to_pyarrow_table(columns=columns)


def civil_from_days(days):
    """Proleptic Gregorian (year, month, day) of a day count since 1970-01-01, for any year
    (Howard Hinnant's algorithm; Python's datetime stops at year 9999)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def render_date(days):
    y, m, d = civil_from_days(days)
    if 0 <= y <= 9999:
        year = f"{y:04d}"
    elif y < 0:
        year = f"-{-y:04d}"
    else:
        year = f"+{y}"
    return f"{year}-{m:02d}-{d:02d}"


UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def fraction(units, per_second):
    if per_second == 1:
        return ""
    digits = len(str(per_second)) - 1
    text = f"{units:0{digits}d}".rstrip("0")
    return "." + text if text else ""


def render_timestamp(value, unit, zoned):
    per_second = UNITS_PER_SECOND[unit]
    seconds, units = divmod(value, per_second)
    days, second_of_day = divmod(seconds, 86400)
    hh, rest = divmod(second_of_day, 3600)
    mm, ss = divmod(rest, 60)
    text = f"{render_date(days)}T{hh:02d}:{mm:02d}:{ss:02d}{fraction(units, per_second)}"
    return text + "Z" if zoned else text


def render_time(value, unit):
    per_second = UNITS_PER_SECOND[unit]
    seconds, units = divmod(value, per_second)
    hh, rest = divmod(seconds, 3600)
    mm, ss = divmod(rest, 60)
    return f"{hh:02d}:{mm:02d}:{ss:02d}{fraction(units, per_second)}"


def render_float(x, width):
    if x is None:
        return None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if width == 64:
        return x
    # Shortest decimal that reads back as the same float32/float16 (Python floats are doubles,
    # so 0.1f would otherwise print as 0.10000000149011612).
    fmt = "<f" if width == 32 else "<e"
    packed = struct.pack(fmt, x)
    for precision in range(1, 18):
        candidate = float(f"{x:.{precision}g}")
        try:
            if struct.pack(fmt, candidate) == packed:
                return candidate
        except OverflowError:  # rounded past the type's largest finite value
            continue
    return x


def render_decimal(d, scale):
    if d is None:
        return None
    if not d.is_finite():
        return str(d)
    return format(d.quantize(decimal.Decimal(1).scaleb(-scale)), "f")


def as_ints(arr, int_type):
    return arr.cast(int_type).to_pylist()


def render_array(arr):
    """Renders every value of a pyarrow Array (not chunked) as a JSON-ready Python value."""
    t = arr.type
    if pa.types.is_dictionary(t):
        return render_array(arr.dictionary_decode())
    if isinstance(t, pa.ExtensionType):
        return render_array(arr.storage)
    if pa.types.is_null(t):
        return [None] * len(arr)
    if pa.types.is_floating(t):
        width = t.bit_width
        if width == 16:  # to_pylist of half floats needs numpy; float32 holds them exactly
            arr = arr.cast(pa.float32())
        return [render_float(x, width) for x in arr.to_pylist()]
    if pa.types.is_decimal(t):
        return [render_decimal(d, t.scale) for d in arr.to_pylist()]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
            or getattr(pa.types, "is_binary_view", lambda _: False)(t):
        return [None if b is None else "\\x" + b.hex() for b in arr.to_pylist()]
    if pa.types.is_date32(t) or pa.types.is_date64(t):
        if pa.types.is_date64(t):
            arr = arr.cast(pa.date32())
        return [None if d is None else render_date(d) for d in as_ints(arr, pa.int32())]
    if pa.types.is_timestamp(t):
        zoned = t.tz is not None
        return [None if v is None else render_timestamp(v, t.unit, zoned)
                for v in as_ints(arr, pa.int64())]
    if pa.types.is_time(t):
        ints = as_ints(arr, pa.int64() if t.bit_width == 64 else pa.int32())
        return [None if v is None else render_time(v, t.unit) for v in ints]
    if pa.types.is_map(t):
        keys = render_array(arr.keys)
        items = render_array(arr.items)
        return [{map_key(keys[i]): items[i] for i in range(start, end)} if valid else None
                for valid, start, end in list_bounds(arr)]
    if pa.types.is_fixed_size_list(t):
        n = t.list_size
        values = render_array(arr.values)
        return [values[(arr.offset + i) * n:(arr.offset + i + 1) * n] if valid else None
                for i, valid in enumerate(valid_flags(arr))]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = render_array(arr.values)
        return [values[start:end] if valid else None for valid, start, end in list_bounds(arr)]
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        columns = [render_array(child) for child in arr.flatten()]
        return [dict(zip(names, (c[i] for c in columns))) if valid else None
                for i, valid in enumerate(valid_flags(arr))]
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_string(t) \
            or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return arr.to_pylist()
    # Anything else (durations, intervals, unions): Python's own rendering, as text.
    return [None if v is None else (v if isinstance(v, (bool, int, str)) else str(v))
            for v in arr.to_pylist()]


def map_key(k):
    return k if isinstance(k, str) else json.dumps(k, separators=(",", ":"))


def valid_flags(arr):
    return arr.is_valid().to_pylist()


def list_bounds(arr):
    """(valid, start, end) per list value; offsets index into `arr.values`, which ignores any
    slice offset of `arr` itself."""
    offsets = arr.offsets.to_pylist()
    return [(valid, offsets[i], offsets[i + 1]) for i, valid in enumerate(valid_flags(arr))]


def render_column(column):
    out = []
    for chunk in column.chunks:
        out.extend(render_array(chunk))
    return out


LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def sort_value(v):
    if v is None:
        return (0, 0, "")
    if isinstance(v, str):
        m = LSN.match(v)
        if m:
            return (1, (int(m.group(1), 16) << 32) | int(m.group(2), 16), "")
        return (2, 0, v)
    if isinstance(v, (int, float)):
        return (1, v, "")
    return (2, 0, json.dumps(v, sort_keys=True))


def rows(table):
    names = table.column_names
    columns = [render_column(table.column(i)) for i in range(table.num_columns)]
    keys = [names.index(k) for k in ("_lsn", "_seq") if k in names]
    lines = []
    for r in range(table.num_rows):
        values = [c[r] for c in columns]
        text = json.dumps(dict(zip(names, values)), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
        lines.append((tuple(sort_value(values[k]) for k in keys), text))
    lines.sort()
    return [text for _, text in lines]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("uri", help="table URI: a path, file://..., or s3://bucket/prefix")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for s3:// URIs")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--count", action="store_true", help="print only the row count")
    what.add_argument("--version", action="store_true", help="print only the table version")
    what.add_argument("--files", action="store_true", help="print the data files, one per line")
    what.add_argument(
        "--marked",
        action="store_true",
        help="print the rows the data files hold that deletion vectors mark as deleted",
    )
    args = p.parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8")
    try:
        dt = DeltaTable(args.uri, storage_options=storage_options(args.uri, args.s3_endpoint))
        if args.version:
            print(dt.version())
            return 0
        if args.files:
            for f in sorted(dt.file_uris()):
                print(f)
            return 0
        table = arrow_table(dt)
        if args.marked:
            physical = pa.table(dt.get_add_actions(flatten=True)).column("num_records")
            print(sum(v for v in physical.to_pylist() if v is not None) - table.num_rows)
            return 0
        if args.count:
            print(table.num_rows)
            return 0
        out = sys.stdout
        for line in rows(table):
            out.write(line)
            out.write("\n")
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - a script for tests: one line, no traceback
        print(f"read_delta: error: {args.uri}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def exit_now(code):
    """Flushes and leaves without interpreter finalization: delta-rs's threads and pyarrow's
    thread pools are torn down in an order that aborts now and then ("terminate called without
    an active exception", delta-rs issue 2184) after all the work is done."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
