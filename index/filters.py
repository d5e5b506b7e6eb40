"""Metadata filters, applied inside retrieval: declared fields, per-segment columns, boolean row masks.

A collection declares the metadata fields filters may use (`filterable`: field -> type). Each segment
stores those fields as columns (filters.npz), built from its documents' metadata when the segment is
written, so compaction and repair rebuild them with the rows they keep. A filter is Qdrant-shaped:

    {"must": [cond, ...], "should": [cond, ...], "must_not": [cond, ...]}
    cond: {"field": f, "match": v}            equal (a list-valued field matches if any element does)
          {"field": f, "any": [v, ...]}       equal to one of them
          {"field": f, "range": {"gte": a, "lt": b, ...}}   numbers, or RFC 3339 times for datetime fields
          {"field": f, "exists": true|false}
          {"ids": [id, ...]}                  these documents only
          {"must": ..., "should": ..., "must_not": ...}   a nested filter

`should` needs at least one of its conditions when given. Evaluating a filter on a segment gives the
rows it admits; retrievers treat the others like tombstones, but ranking statistics (BM25's document
frequencies and lengths) stay those of the whole collection, as in Elasticsearch's filter context.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptIndex, InvalidArgument

TYPES = ("keyword", "integer", "float", "bool", "datetime")
FILE = "filters.npz"
RANGE_BOUNDS = ("gt", "gte", "lt", "lte")


def check_schema(filterable: dict) -> None:
    for field, kind in filterable.items():
        if not isinstance(field, str) or not field or not field.isprintable():
            raise InvalidArgument(f"filterable field names are non-empty printable strings, not {field!r}")
        if kind not in TYPES:
            raise InvalidArgument(f"filterable field {field!r} has type {kind!r}; choose from {', '.join(TYPES)}")


def _timestamp(value, where: str) -> float:
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"{where}: {value!r} is not an RFC 3339 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment.timestamp()
    raise InvalidArgument(f"{where}: a time is an RFC 3339 string, not {value!r}")


def to_number(kind: str, value, where: str) -> float:
    """One metadata or filter value as the column stores it (keywords are handled apart)."""
    if kind == "datetime":
        return _timestamp(value, where)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where}: expected true or false, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{where}: expected a finite number, got {value!r}")
    if kind == "integer" and float(value) != int(value):
        raise InvalidArgument(f"{where}: expected a whole number, got {value!r}")
    return float(value)


def _values(metadata: dict, field: str) -> list:
    value = metadata.get(field)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def check_metadata(metadata: dict, filterable: dict, doc_id: str) -> None:
    """A document whose filterable fields have the wrong type is refused at ingestion, not skipped."""
    for field, kind in filterable.items():
        for value in _values(metadata, field):
            where = f"document {doc_id!r}: metadata {field!r}"
            if kind == "keyword":
                if not isinstance(value, str):
                    raise InvalidArgument(f"{where}: a keyword field holds strings, got {value!r}")
            else:
                to_number(kind, value, where)


@dataclass
class Column:
    """One field over a segment's rows: row r holds values[offsets[r]:offsets[r + 1]]."""

    offsets: np.ndarray  # (rows + 1,) int64
    values: np.ndarray  # float64 numbers, or int32 codes into vocabulary
    vocabulary: list[str] | None  # keyword fields

    def rows_where(self, test: np.ndarray) -> np.ndarray:
        """Rows with at least one value passing `test` (a boolean per stored value)."""
        passed = np.concatenate([[0], np.cumsum(test, dtype="int64")])
        return passed[self.offsets[1:]] > passed[self.offsets[:-1]]


def write_columns(directory: Path, metadata: list[dict], filterable: dict) -> None:
    if not filterable:
        return
    arrays = {"fields": np.array(list(filterable), dtype=str)}  # array names are positions: any field name works
    for position, (field, kind) in enumerate(filterable.items()):
        per_row = [_values(m, field) for m in metadata]
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in per_row])]).astype("int64")
        flat = [v for values in per_row for v in values]
        if kind == "keyword":
            vocabulary = sorted(set(flat))
            code = {word: i for i, word in enumerate(vocabulary)}
            arrays[f"{position}.values"] = np.array([code[v] for v in flat], "int32")
            arrays[f"{position}.vocabulary"] = np.array(vocabulary, dtype=str)
        else:
            arrays[f"{position}.values"] = np.array([to_number(kind, v, field) for v in flat], "float64")
        arrays[f"{position}.offsets"] = offsets
    np.savez(directory / FILE, **arrays)


def read_columns(directory: Path, filterable: dict, label: str) -> dict[str, Column]:
    if not filterable:
        return {}
    path = directory / FILE
    if not path.exists():  # a segment written before the field was declared: no document has it
        return {}
    with np.load(path) as stored:
        columns = {}
        for position, field in enumerate(stored["fields"].tolist()):
            if field not in filterable:
                continue
            vocabulary = stored[f"{position}.vocabulary"].tolist() if filterable[field] == "keyword" else None
            columns[field] = Column(stored[f"{position}.offsets"], stored[f"{position}.values"], vocabulary)
    for field, column in columns.items():
        if column.offsets[-1] != len(column.values):
            raise CorruptIndex(f"{label}/{FILE}: field {field!r} is inconsistent")
    return columns


class Filter:
    """A validated filter; `admits(columns, ids)` gives the rows of one segment it lets through."""

    def __init__(self, spec: dict, filterable: dict):
        self.filterable = filterable
        self.spec = self._checked(spec, "filter")

    def _checked(self, spec, where: str) -> dict:
        if not isinstance(spec, dict):
            raise InvalidArgument(f"{where} must be an object with must, should or must_not")
        unknown = set(spec) - {"must", "should", "must_not"}
        if unknown:
            raise InvalidArgument(f"{where}: unknown key(s) {sorted(unknown)}; use must, should, must_not")
        for clause, conditions in spec.items():
            if not isinstance(conditions, list):
                raise InvalidArgument(f"{where}.{clause} must be a list of conditions")
            for i, condition in enumerate(conditions):
                self._check_condition(condition, f"{where}.{clause}[{i}]")
        return spec

    def _check_condition(self, condition, where: str) -> None:
        if not isinstance(condition, dict):
            raise InvalidArgument(f"{where} must be an object")
        if set(condition) & {"must", "should", "must_not"}:
            self._checked(condition, where)
            return
        if "ids" in condition:
            if set(condition) != {"ids"} or not isinstance(condition["ids"], list) \
                    or not all(isinstance(i, str) for i in condition["ids"]):
                raise InvalidArgument(f"{where}: ids is a list of document ids, alone in its condition")
            return
        tests = set(condition) - {"field"}
        if len(tests) != 1 or not tests <= {"match", "any", "range", "exists"}:
            raise InvalidArgument(f"{where}: a condition has a field and one of match, any, range, exists "
                                  f"(or is ids, or a nested filter); got {sorted(condition)}")
        field = condition.get("field")
        if field not in self.filterable:
            raise InvalidArgument(f"{where}: field {field!r} is not filterable in this collection; declared: "
                                  f"{', '.join(self.filterable) or 'none'} (setting 'filterable')")
        kind = self.filterable[field]
        (test,) = tests
        if test == "exists":
            if not isinstance(condition["exists"], bool):
                raise InvalidArgument(f"{where}: exists is true or false")
        elif test in ("match", "any"):
            values = [condition["match"]] if test == "match" else condition["any"]
            if not isinstance(values, list) or not values:
                raise InvalidArgument(f"{where}: any is a non-empty list of values")
            for value in values:
                if kind == "keyword":
                    if not isinstance(value, str):
                        raise InvalidArgument(f"{where}: {field!r} is a keyword field; match strings, not {value!r}")
                else:
                    to_number(kind, value, f"{where} ({field!r} is {kind})")
        else:
            bounds = condition["range"]
            if kind in ("keyword", "bool"):
                raise InvalidArgument(f"{where}: {field!r} is a {kind} field, which has no order; use match or any")
            if not isinstance(bounds, dict) or not bounds or set(bounds) - set(RANGE_BOUNDS):
                raise InvalidArgument(f"{where}: range takes gt, gte, lt, lte")
            for bound, value in bounds.items():
                to_number(kind, value, f"{where}.range.{bound} ({field!r} is {kind})")

    # Evaluation ---------------------------------------------------------------------------------
    def admits(self, columns: dict[str, Column], ids: list[str]) -> np.ndarray:
        return self._evaluate(self.spec, columns, ids)

    def _evaluate(self, spec: dict, columns, ids) -> np.ndarray:
        rows = len(ids)
        result = np.ones(rows, bool)
        for condition in spec.get("must", []):
            result &= self._condition(condition, columns, ids)
        if spec.get("should"):
            result &= np.logical_or.reduce([self._condition(c, columns, ids) for c in spec["should"]])
        for condition in spec.get("must_not", []):
            result &= ~self._condition(condition, columns, ids)
        return result

    def _condition(self, condition: dict, columns, ids) -> np.ndarray:
        if set(condition) & {"must", "should", "must_not"}:
            return self._evaluate(condition, columns, ids)
        if "ids" in condition:
            return np.isin(np.asarray(ids, dtype=object), list(condition["ids"]))
        field = condition["field"]
        kind = self.filterable[field]
        column = columns.get(field)
        if column is None:  # no document of this segment has the field
            return np.full(len(ids), condition.get("exists") is False)
        if "exists" in condition:
            present = np.diff(column.offsets) > 0
            return present if condition["exists"] else ~present
        if "range" in condition:
            test = np.ones(len(column.values), bool)
            for bound, value in condition["range"].items():
                limit = to_number(kind, value, field)
                test &= {"gt": np.greater, "gte": np.greater_equal, "lt": np.less,
                         "lte": np.less_equal}[bound](column.values, limit)
            return column.rows_where(test)
        wanted = [condition["match"]] if "match" in condition else condition["any"]
        if kind == "keyword":
            codes = np.flatnonzero(np.isin(np.asarray(column.vocabulary, dtype=str), wanted))
            return column.rows_where(np.isin(column.values, codes))
        return column.rows_where(np.isin(column.values, [to_number(kind, v, field) for v in wanted]))
