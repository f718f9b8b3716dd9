"""Property: a broken sweep spec, however it is broken, gets a SpecError that names the file and a field,
never a traceback from inside, and nothing starts."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csc.spec_loader import load_spec
from csc.errors import SpecError
from csc.sweep.spec import SweepSpec

GOOD = {
    "model": {"name": "tiny-gemma2"},
    "activations": {"layer": 2},
    "sae": {"dict_size": 128},
    "trainer": {"steps": 40, "batch_size": 64, "log_every": 5},
    "sweep": {"num_samples": 4,
              "search": {"trainer.beta": {"type": "loguniform", "low": 0.001, "high": 0.1},
                         "sae.dict_size": {"type": "choice", "values": [64, 128]}},
              "points_to_evaluate": [{"trainer.beta": 0.01, "sae.dict_size": 64}],
              "scheduler": {"grace_period": 10},
              "objectives": [{"metric": "ev", "mode": "max"}]},
}

# Values of every YAML kind, including ones no field takes.
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def paths(node, prefix=()):
    """Every (path, value) in a nested spec, lists included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


ALL_PATHS = [p for p, _ in paths(GOOD) if p]


def set_at(data, path, value):
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(ALL_PATHS), junk), min_size=1, max_size=3),
       extra=st.one_of(st.none(), st.tuples(st.sampled_from([p for p, v in paths(GOOD) if isinstance(v, dict)]),
                                            st.text(min_size=1, max_size=8), junk)))
def test_any_broken_spec_is_refused_by_field(tmp_path_factory, edits, extra):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in edits:
        try:
            set_at(data, path, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit replaced a parent of this path
    if extra is not None:
        parent, key, value = extra
        try:
            node = data
            for part in parent:
                node = node[part]
            if isinstance(node, dict) and key not in node:
                node[key] = value
        except (KeyError, IndexError, TypeError):
            pass
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        spec = load_spec(SweepSpec, path)
    except SpecError as e:
        for line in str(e).splitlines():
            assert line.startswith(f"{path}: "), line
            assert len(line) > len(f"{path}: ") + 3
        return
    # Some edits leave a valid spec (e.g. a new number in range): then every trial must be buildable.
    for point in spec.sweep.points_to_evaluate:
        spec.trial(point)
