"""JSON Schemas for the structured-output tests: enums, numeric bounds, nested objects, arrays, required and
optional keys, string patterns, $defs/$ref, anyOf, const. Strings and numbers are bounded (maxLength, pattern,
minimum/maximum) because a random-weight model never chooses to close an unbounded string: the grammar makes
any output valid, but only the model decides when a free string ends."""

NAME = {"type": "string", "maxLength": 12}

SCHEMAS = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "int_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 120}},
                   "required": ["n"]},
    "exclusive_bounds": {"type": "object", "properties": {
        "x": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}, "required": ["x"]},
    "number_bounds": {"type": "object", "properties": {"t": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["t"]},
    "boolean": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    "null_or_int": {"type": "object", "properties": {"v": {"type": ["integer", "null"], "minimum": 0,
                                                           "maximum": 9}}, "required": ["v"]},
    "string_len": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 6}},
                   "required": ["s"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"]},
    "date_pattern": {"type": "object", "properties": {
        "day": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"}},
        "required": ["day"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99}},
                 "required": ["name", "age"]}}, "required": ["user"]},
    "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"enum": [1, 2, 3]}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    "array_ints": {"type": "object", "properties": {"xs": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4}}, "required": ["xs"]},
    "array_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"]}}},
        "required": ["items"]},
    "top_array": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2, "maxItems": 3},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 5}, {"enum": ["u"]}],
              "items": False},
    "optional_keys": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 50},
                                                       "note": NAME, "flag": {"type": "boolean"}},
                      "required": ["id"]},
    "all_optional": {"type": "object", "properties": {"p": {"enum": ["on", "off"]}, "q": {"type": "boolean"}}},
    "const": {"type": "object", "properties": {"version": {"const": 2}, "kind": {"const": "point"}},
              "required": ["version", "kind"]},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none", "all"]}]}}, "required": ["value"]},
    "defs_ref": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"]},
    "top_enum": {"enum": ["yes", "no", "maybe"]},
    "top_integer": {"type": "integer", "minimum": 100, "maximum": 999},
    "mixed_record": {"type": "object", "properties": {
        "title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "sf"]}, "maxItems": 2},
        "rating": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["title", "year", "genres"]},
}
