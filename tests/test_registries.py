"""Both registries take a name once: a second class under a taken name is refused, naming the first."""

import pytest

from pytorch_quantizer.observers import Observer, ObserverError, observer_class, register_observer, unregister_observer


def test_register_observer_refuses_a_taken_name():
    first = type("FirstCount", (Observer,), {"name": "test_count"})
    second = type("SecondCount", (Observer,), {"name": "test_count"})
    register_observer(first)
    try:
        register_observer(first)  # the same class again is harmless (a module imported twice)
        with pytest.raises(ObserverError, match="already registered.*FirstCount"):
            register_observer(second)
        assert observer_class("test_count") is first
    finally:
        unregister_observer("test_count")
    with pytest.raises(ObserverError, match="unknown observer"):
        observer_class("test_count")


def test_register_observer_refuses_a_name_that_is_not_one():
    with pytest.raises(ObserverError, match="needs a name"):
        register_observer(type("Nameless", (Observer,), {"name": "a b"}))


def test_builtin_observer_names_are_taken():
    moments = observer_class("moments")
    with pytest.raises(ObserverError, match="already registered"):
        register_observer(type("Impostor", (moments,), {"name": "moments"}))
    assert observer_class("moments") is moments
