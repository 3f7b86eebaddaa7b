"""Host sets (remote_control -w, -x, -b): expansion, matching, folding, gathering."""

import random

import pytest

from dynfarm import MAX_HOSTS, expand_hosts, fold_hosts, gather_outputs, host_sort_key, match_hosts


# --- expand_hosts ---

@pytest.mark.parametrize("text, names", [
    ("aruba-[0001-0003,0010]", ["aruba-0001", "aruba-0002", "aruba-0003", "aruba-0010"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("node7", ["node7"]),
    ("a1b02", ["a1b02"]),
    ("web, db ,mail", ["web", "db", "mail"]),
    ("n[3,1-2]", ["n3", "n1", "n2"]),                       # order as written
    ("n2,n[1-3],n2", ["n2", "n1", "n3"]),                   # duplicates once, first place kept
    ("x[007]", ["x007"]),
    ("n[0-2]", ["n0", "n1", "n2"]),
    ("n[00-02]", ["n00", "n01", "n02"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[98-101]", ["n98", "n99", "n100", "n101"]),
    ("[1-2].lan", ["1.lan", "2.lan"]),
    ("a[1-2]-b[1-2]-c[1-2]", ["a1-b1-c1", "a1-b1-c2", "a1-b2-c1", "a1-b2-c2",
                              "a2-b1-c1", "a2-b1-c2", "a2-b2-c1", "a2-b2-c2"]),
    ("a-[1,3],b[5-6]", ["a-1", "a-3", "b5", "b6"]),
    ("aruba-00*,n?[1-2]", ["aruba-00*", "n?1", "n?2"]),     # wildcards are left for match_hosts
])
def test_expand(text, names):
    assert expand_hosts(text) == names


@pytest.mark.parametrize("text, names", [
    ("n[01-100]", ["n%02d" % i for i in range(1, 101)]),   # lower bound's width pads, like clush
    ("n[1-010]", ["n%d" % i for i in range(1, 11)]),        # upper bound's zeros are ignored
    ("n[001-3]", ["n001", "n002", "n003"]),
    ("n[0-00]", ["n0"]),
])
def test_expand_padding_follows_lower_bound(text, names):
    assert expand_hosts(text) == names


@pytest.mark.parametrize("text, message", [
    ("aruba-[0001-0003", r"'\[' never closed in host set at '\[0001-0003'"),
    ("a,b]", r"'\]' without '\[' in host item 'b\]'"),
    ("a[1[2]]", r"'\[' inside brackets in host set at '\[1\['"),
    ("a,,b", r"empty item in host set 'a,,b'"),
    ("a,", r"empty item"),
    ("", r"empty item"),
    ("  ", r"empty item"),
    ("n[]", r"empty range in host item 'n\[\]'"),
    ("n[1,,2]", r"empty range in host item 'n\[1,,2\]'"),
    ("n[5-3]", r"reversed range '5-3' in host item 'n\[5-3\]'"),
    ("n[a-3]", r"range 'a-3' is not N or N-M in host item 'n\[a-3\]'"),
    ("n[1-b]", r"range '1-b' is not N or N-M"),
    ("n[-3]", r"range '-3' is not N or N-M"),
    ("n[1-3/2]", r"range '1-3/2' is not N or N-M"),
    ("n[ 1]", r"whitespace inside host item"),
    ("aruba 0001", r"whitespace inside host item 'aruba 0001'"),
    ("n[0-999999999]", r"more than 100000 names at 'n\[0-999999999\]'"),
    ("a[1-1000]b[1-1000]", r"more than 100000 names"),         # the product counts
    ("a[1-60000],b[1-60000]", r"more than 100000 names at 'b\[1-60000\]'"),  # so does the total
])
def test_expand_errors(text, message):
    with pytest.raises(ValueError, match=message):
        expand_hosts(text)


def test_expand_limit_is_inclusive():
    assert len(expand_hosts(f"n[1-{MAX_HOSTS}]")) == MAX_HOSTS
    with pytest.raises(ValueError):
        expand_hosts(f"n[1-{MAX_HOSTS}],m1")


# --- match_hosts ---

KNOWN = ["aruba-0001", "aruba-0002", "aruba-0010", "aruba-0011", "other-0001", "web", "web2"]


@pytest.mark.parametrize("text, selected, unmatched", [
    ("aruba-0002,aruba-0001", ["aruba-0001", "aruba-0002"], []),              # known's order
    ("aruba-*", KNOWN[:4], []),
    ("*-0001", ["aruba-0001", "other-0001"], []),
    ("aruba-001?", ["aruba-0010", "aruba-0011"], []),
    ("web?", ["web2"], []),
    ("web*", ["web", "web2"], []),
    ("*", KNOWN, []),
    ("aruba-00[0-1]*", KNOWN[:4], []),                                          # ranges inside patterns
    ("aruba-[0001-0003]", ["aruba-0001", "aruba-0002"], ["aruba-0003"]),
    ("ghost,gh*st,web", ["web"], ["ghost", "gh*st"]),
    ("aruba-.*", [], ["aruba-.*"]),                                             # . is literal, not regex
    ("aruba", [], ["aruba"]),                                                   # exact means exact
])
def test_match(text, selected, unmatched):
    assert match_hosts(text, KNOWN) == (selected, unmatched)


def test_match_patterns_cover_the_whole_name():
    assert match_hosts("n?,m*1", ["n1", "n12", "m1", "m12", "xm1"]) == (["n1", "m1"], [])


def test_match_takes_any_iterable_and_drops_duplicates():
    assert match_hosts("n*", iter(["n2", "n1", "n2"])) == (["n2", "n1"], [])


def test_match_reports_unmatched_that_fold_back():
    _, unmatched = match_hosts("aruba-[0001-0020]", KNOWN)
    assert fold_hosts(unmatched) == "aruba-[0003-0009,0012-0020]"


def test_match_bad_text_raises():
    with pytest.raises(ValueError, match="reversed range"):
        match_hosts("aruba-[3-1]", KNOWN)


# --- fold_hosts ---

@pytest.mark.parametrize("names, text", [
    (["aruba-0001", "aruba-0002", "aruba-0003", "aruba-0007"], "aruba-[0001-0003,0007]"),
    (["aruba-0007"], "aruba-0007"),
    (["n1", "n01"], "n1,n01"),                                  # widths never merge
    (["n01", "n02", "n1", "n2", "n001"], "n[1-2],n[01-02],n001"),
    (["n9", "n10", "n11"], "n[9-11]"),                          # unpadded numbers of any length merge
    (["aruba-0999", "aruba-1000", "aruba-10000"], "aruba-[0999-1000,10000]"),  # past the width
    (["n10", "n11"], "n[10-11]"),
    (["n08", "n09", "n10"], "n[08-10]"),
    (["web", "db", "n1"], "db,n1,web"),                         # names without digits as they are
    (["node", "node1", "node2"], "node,node[1-2]"),
    (["r1n01", "r1n02", "r2n01"], "r1n[01-02],r2n01"),          # the last number folds
    (["a1.lan", "a2.lan", "a1", "a3"], "a[1,3],a[1-2].lan"),
    (["n10", "n2", "n1"], "n[1-2,10]"),                          # numeric, not text, order
    (["b1", "a1", "a2"], "a[1-2],b1"),
    (["n0", "n00", "n000"], "n0,n00,n000"),
    (["x1", "x1", "x2"], "x[1-2]"),
    ([], ""),
])
def test_fold(names, text):
    assert fold_hosts(names) == text


@pytest.mark.parametrize("names, text", [
    (["aruba-%04d" % i for i in (1, 2, 3, 10, 11, 999, 1000, 1001, 12345)],
     "aruba-[0001-0003,0010-0011,0999-1001,12345]"),
    (["n%d" % i for i in range(30)] + ["n%02d" % i for i in range(30)] + ["n%03d" % i for i in range(130)],
     "n[0-9],n[00-29],n[000-129]"),
    (["0001", "0002", "7", "10"], "[0001-0002],[7,10]"),                  # names that are only digits
    (["n0", "n00", "n000", "n0000"], "n0,n00,n000,n0000"),
])
def test_zero_padding_round_trip(names, text):
    assert fold_hosts(names) == text
    expanded = expand_hosts(text)
    assert len(expanded) == len(set(names))
    assert set(expanded) == set(names)


def random_names(rng):
    """Names that stress padding: fixed widths overflowing, mixed widths, suffixes, no digits."""
    names = set()
    for _ in range(rng.randint(1, 40)):
        prefix = rng.choice(["aruba-", "n", "r1n", "a1b", "x-", "", "web"])
        suffix = rng.choice(["", "", "", ".lan", "-eth"])
        width = rng.choice([0, 1, 2, 3, 4])
        number = rng.choice([rng.randint(0, 12), rng.randint(0, 1200), rng.randint(90, 110)])
        names.add(prefix + ("%0*d" % (width, number)) + suffix)
        if rng.random() < 0.1:
            names.add(rng.choice(["web", "db", "mail-x", "node"]))
    return names


def test_round_trip_random():
    rng = random.Random(1234)
    for _ in range(400):
        names = random_names(rng)
        folded = fold_hosts(names)
        expanded = expand_hosts(folded)
        assert len(expanded) == len(names), folded             # nothing twice, nothing lost
        assert set(expanded) == names, folded
        assert fold_hosts(expanded) == folded
        shuffled = list(names)
        rng.shuffle(shuffled)
        assert fold_hosts(shuffled) == folded                   # order of input does not matter


# --- gather_outputs ---

def test_gather_groups_identical_outputs():
    outputs = {"aruba-0003": b"ok\n", "aruba-0001": b"ok\n", "aruba-0002": b"disk full\n",
               "aruba-0010": b"ok\n", "web": b"disk full\n", "aruba-0004": b"ok\n"}
    assert gather_outputs(outputs) == [
        ("aruba-[0001,0003-0004,0010]", b"ok\n"),
        ("aruba-0002,web", b"disk full\n"),
    ]


def test_gather_orders_groups_by_their_first_host():
    outputs = {"n10": "a", "n9": "b", "n2": "c", "n1": "b"}
    assert gather_outputs(outputs) == [("n[1,9]", "b"), ("n2", "c"), ("n10", "a")]


def test_gather_keeps_bytes_and_str_apart_and_empty():
    assert gather_outputs({"n1": b"x", "n2": "x"}) == [("n1", b"x"), ("n2", "x")]
    assert gather_outputs({}) == []


def test_host_sort_key_counts_like_people():
    assert sorted(["n10", "n9", "web", "n01", "m2"], key=host_sort_key) == ["m2", "n01", "n9", "n10", "web"]
