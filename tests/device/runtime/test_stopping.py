"""Stop strings over streamed text: held back while undecided, cut before the match."""

from __future__ import annotations

from device.runtime.stopping import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[str, str | None]:
    m = StopMatcher(stops)
    out = []
    for d in deltas:
        update = m.push(d)
        out.append(update.text)
        if update.stopped:
            return "".join(out), update.stopped
    return "".join(out) + m.flush(), None


def test_no_stops_passes_text_through() -> None:
    assert run([], ["a", "b"]) == ("ab", None)


def test_stop_straddling_deltas_is_cut_and_not_sent() -> None:
    assert run(["###"], ["Hello #", "#", "# more"]) == ("Hello ", "###")


def test_partial_match_is_held_back_then_released() -> None:
    m = StopMatcher(["\nUser:"])
    assert m.push("one\nUs").text == "one"  # "\nUs" could begin the stop string
    assert m.push("ed it").text == "\nUsed it"  # it did not
    assert m.flush() == ""


def test_held_back_tail_is_flushed_at_the_end() -> None:
    assert run(["STOP"], ["go ST"]) == ("go ST", None)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["b", "cd"], ["xxcdb"]) == ("xx", "cd")


def test_stop_at_the_very_start() -> None:
    assert run(["hi"], ["hi there"]) == ("", "hi")
