"""The JSON value checks every settings file shares (utils/options/values.py): what each accepts, what it returns,
and that each refusal names the file, the key and what a valid value is."""
from __future__ import annotations

import json
import logging
import math

import pytest

from utils.options import values
from utils.options.values import ConfigError

WHERE = "cfgs/some.json"
HUGE = 10 ** 400  # an integer too large for a float


def refusal(check, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as error:
        check(WHERE, "the_key", *args, **kwargs)
    message = str(error.value)
    assert message.startswith(f"{WHERE}: key 'the_key' "), message
    return message


def test_config_error_is_one_class_wherever_it_is_imported_from():
    import utils.options
    from utils.options import config

    assert config.ConfigError is ConfigError is utils.options.ConfigError


# -- numbers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 3, -2.5, 1e-8, 1.0, 2**70])
def test_number_accepts_finite_numbers_as_floats(value):
    result = values.number(WHERE, "the_key", value)
    assert type(result) is float and result == value


@pytest.mark.parametrize("value", ["1", None, True, False, [1], {"a": 1}])
def test_number_refuses_what_is_not_a_number(value):
    assert f"must be a number, got {json.dumps(value)}." in refusal(values.number, value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, HUGE])
def test_number_refuses_what_is_not_finite(value):
    assert f"is {json.dumps(value)}; it must be a finite number." in refusal(values.number, value)


@pytest.mark.parametrize("value, expected", [
    (0, True), (-3, True), (2.5, True), (2**70, True),
    (True, False), ("1", False), (None, False), (math.nan, False), (math.inf, False), (HUGE, False)])
def test_is_number(value, expected):
    assert values.is_number(value) is expected


@pytest.mark.parametrize("value, expected", [
    (0, True), (4, True), (4.0, True), (-1, True), (2.5, False), (True, False), ("4", False), (math.inf, False),
    (math.nan, False)])
def test_is_whole(value, expected):
    assert values.is_whole(value) is expected


@pytest.mark.parametrize("value, expected", [(0, 0), (7, 7), (7.0, 7), (-1, -1), (HUGE, HUGE)])
def test_integer_accepts_whole_numbers_as_ints(value, expected):
    result = values.integer(WHERE, "the_key", value)
    assert type(result) is int and result == expected


@pytest.mark.parametrize("value", [1.5, "3", True, None, [3], math.nan, math.inf])
def test_integer_refuses_what_is_not_whole(value):
    assert f"must be a whole number, got {json.dumps(value)}." in refusal(values.integer, value)


def test_integer_minimum_and_why():
    assert values.integer(WHERE, "the_key", 1, 1) == 1
    assert "is 0; it must be at least 1." in refusal(values.integer, 0, 1)
    assert "is -2; it must be at least -1 (-1 = a random seed)." in refusal(values.integer, -2.0, -1,
                                                                              "-1 = a random seed")


@pytest.mark.parametrize("value", [0.15, 0.5, 1e-9, 0.999])
def test_proportion_accepts_fractions_between_0_and_1(value):
    assert values.proportion(WHERE, "the_key", value) == value


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_proportion_refuses_0_1_and_beyond(value):
    message = refusal(values.proportion, value, "0.15 = 15% of the images")
    assert message.endswith(f"is {json.dumps(value)}; it must be a fraction above 0 and below 1 "
                            "(0.15 = 15% of the images).")
    assert refusal(values.proportion, value).endswith("above 0 and below 1.")


def test_proportion_refuses_what_is_not_a_number():
    assert "must be a number" in refusal(values.proportion, "0.2")
    assert "must be a finite number" in refusal(values.proportion, math.nan)


# -- true/false and text -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False])
def test_boolean_accepts_true_and_false(value):
    assert values.boolean(WHERE, "the_key", value) is value


@pytest.mark.parametrize("value", [1, 0, "yes", None, "true", "False"])
def test_boolean_refuses_anything_else(value):
    assert f"must be true or false, got {json.dumps(value)}." in refusal(values.boolean, value)


@pytest.mark.parametrize("value, meant", [("true", True), (" False ", False), ("TRUE", True)])
def test_boolean_takes_quoted_words_at_their_word_with_a_warning_when_asked(value, meant, caplog):
    with caplog.at_level(logging.WARNING):
        assert values.boolean(WHERE, "the_key", value, quoted=True) is meant
    assert f"{WHERE}: 'the_key' is the string {json.dumps(value)}" in caplog.text
    assert "without quotes" in caplog.text
    assert "must be true or false" in refusal(values.boolean, "yes", quoted=True)


@pytest.mark.parametrize("value", ["", "a photo of a cat", "ünïcödé"])
def test_string_accepts_text(value):
    assert values.string(WHERE, "the_key", value) == value


@pytest.mark.parametrize("value", [None, 3, True, ["a"]])
def test_string_refuses_what_is_not_text(value):
    assert f"must be a string, got {json.dumps(value)}." in refusal(values.string, value)


def test_string_refuses_a_nul_character():
    assert "holds a NUL character" in refusal(values.string, "a\x00b")


def test_encodable():
    assert values.encodable({"a": ["text", 1, None, "ünïcödé"]})
    assert not values.encodable({"a": "\ud800"})
    assert not values.encodable(["ok", {"x": "half \udfff"}])


# -- names -------------------------------------------------------------------------------------------------------

KNOWN = ("batch_size", "seed", "scheduler")


def test_close_match_and_did_you_mean():
    assert values.close_match("shceduler", KNOWN) == "scheduler"
    assert values.close_match("zzz", KNOWN) is None
    assert values.close_match("batch_sz", KNOWN, cutoff=0.99) is None
    assert values.did_you_mean("sed", KNOWN) == " Did you mean 'seed'?"
    assert values.did_you_mean("zzz", KNOWN) == ""
    assert values.did_you_mean("zzz", KNOWN, " See the docs.") == " See the docs."


def test_unknown_key_suggests_the_closest_key_or_lists_them():
    error = values.unknown_key(WHERE, "batchsize", KNOWN)
    assert isinstance(error, ConfigError)
    assert str(error) == f"{WHERE}: unknown key 'batchsize'. Did you mean 'batch_size'?"
    assert str(values.unknown_key(WHERE, "zzz", KNOWN)) == \
        f"{WHERE}: unknown key 'zzz'. Valid keys: batch_size, seed, scheduler."
    assert str(values.unknown_key(WHERE, "zzz", KNOWN, otherwise=" See doc/FLAGS.md.")) == \
        f"{WHERE}: unknown key 'zzz'. See doc/FLAGS.md."


def test_unknown_key_names_the_key_as_shown_and_matches_it_bare():
    error = values.unknown_key(WHERE, "sed", {"seed": 1, "lr": 2}, shown="base.sed")
    assert str(error) == f"{WHERE}: unknown key 'base.sed'. Did you mean 'seed'?"


CHECKS = {"lr": (values.is_number, "a number"), "steps": (values.is_whole, "a whole number of steps")}


def test_check_section_passes_known_keys_with_valid_values_and_nulls():
    values.check_section(WHERE, "base", {"lr": 1e-6, "steps": 10.0}, CHECKS)
    values.check_section(WHERE, "base", {"lr": None, "steps": None}, CHECKS)
    values.check_section(WHERE, "base", {}, CHECKS)


def test_check_section_names_the_section_key_and_what_is_valid():
    with pytest.raises(ConfigError) as error:
        values.check_section(WHERE, "base", {"lr": 1e-6, "steps": 2.5}, CHECKS)
    assert str(error.value) == f"{WHERE}: base.steps must be a whole number of steps, got 2.5."
    with pytest.raises(ConfigError) as error:
        values.check_section(WHERE, "base", {"lr": math.nan}, CHECKS)
    assert str(error.value) == f"{WHERE}: base.lr must be a number, got nan."
    with pytest.raises(ConfigError) as error:
        values.check_section(WHERE, "base", {"step": 3}, CHECKS)
    assert str(error.value) == f"{WHERE}: unknown key 'base.step'. Did you mean 'steps'?"
