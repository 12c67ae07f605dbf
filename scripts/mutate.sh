#!/usr/bin/env bash
# Mutation testing of one module against its own test files (mutmut 3, not part of CI):
#   scripts/mutate.sh models/losses.py [MUTANT ...]     (or: make mutate MODULE=models/losses.py)
# The tree (tracked and new files) is copied to .mutmut/<module>/, the [tool.mutmut] table of pyproject.toml
# there gets the module (only_mutate) and its tests (pytest_add_cli_args_test_selection), and mutmut runs in
# that copy with $MUTATE_CHILDREN worker processes (default 1). A rerun tests only the mutants not tested yet
# (those of changed functions); MUTANT names or patterns (e.g. 'models.losses.x_scst_loss*': after a new
# test) restrict it to those.
# It ends with the counts and the share of covered mutants killed; docs/development.md says how to read them.
set -euo pipefail

module=${1:?usage: scripts/mutate.sh MODULE.py [MUTANT ...]}
shift
children=${MUTATE_CHILDREN:-1}
case "$module" in
  models/decoding.py) tests="tests/test_decoding.py tests/test_static_decode.py" ;;
  models/static_decode.py) tests="tests/test_static_decode.py" ;;
  models/losses.py) tests="tests/test_losses.py" ;;
  models/sparse_mask.py) tests="tests/test_sparse_mask.py" ;;
  metrics/cider.py) tests="tests/test_cider.py" ;;
  engine/steps.py) tests="tests/test_scst.py tests/test_static_decode.py tests/test_accumulation.py tests/test_grad_checkpointing.py
    tests/test_training.py::test_xe_step_smooths_the_labels_by_train_label_smoothing
    tests/test_compile.py::test_one_graph_serves_every_batch_size_and_caption_length
    tests/test_compile.py::test_compiled_xe_steps_give_the_eager_losses" ;;
  data/transforms.py) tests="tests/test_transforms.py" ;;
  *) echo "scripts/mutate.sh: no test files listed for $module; add a line to its case table" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
"$python" -c "import mutmut" 2>/dev/null || { echo "mutmut is missing: $python -m pip install 'mutmut==3.*'" >&2; exit 2; }
work=$repo/.mutmut/$(basename "${module//\//-}" .py)  # not *.py: the tests glob for entry scripts
mkdir -p "$work"
# The tests find the shared test material beside the repository, not beside the copy.
export OPG_SHARED_DIR=${OPG_SHARED_DIR:-$(dirname "$repo")/shared}
(cd "$repo" && git ls-files --cached --others --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work"
quoted() { printf '"%s", ' "$@" | sed 's/, $//'; }
# shellcheck disable=SC2086  # $tests is a list of paths
printf 'only_mutate = ["%s"]\npytest_add_cli_args_test_selection = [%s]\n' "$module" "$(quoted $tests)" \
  >> "$work/pyproject.toml"
cd "$work"
log=$work/mutmut-run.log  # progress: tail -f it
if ! "$python" -m mutmut run --max-children "$children" "$@" > "$log" 2>&1; then
  tr '\r' '\n' < "$log" | tail -n 40 >&2
  echo "scripts/mutate.sh: mutmut run failed; its output: $log" >&2
  exit 1
fi
"$python" -m mutmut results
"$python" -m mutmut export-cicd-stats > /dev/null
"$python" - "$module" <<'PY'
import json
import sys

s = json.load(open("mutants/mutmut-cicd-stats.json"))
# A mutant that timed out or whose tests were killed by a signal (mutmut's "segfault": its CPU-time limit, or
# memory) was detected as surely as one that failed a test.
detected = s["killed"] + s["timeout"] + s["segfault"]
covered = detected + s["survived"] + s["suspicious"]
share = f"{100 * detected / covered:.1f}%" if covered else "n/a"
print(f"{sys.argv[1]}: {s['total']} mutants, {s['no_tests']} not covered by its tests; of the {covered} covered, "
      f"{s['killed']} killed, {s['timeout']} timed out, {s['segfault']} killed by a signal, {s['survived']} "
      f"survived, {s['suspicious']} suspicious: {share} killed")
PY
