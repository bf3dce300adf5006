#!/usr/bin/env bash
# Trainer image entry point: train each model of NEXTCHAR_MODELS and export it into the model repository.
#
#   NEXTCHAR_MODELS      space-separated NAME=preset:PRESET or NAME=corpus:CORPUS, where CORPUS is a
#                        built-in corpus (goethe, anthem) or a UTF-8 file, e.g. one mounted under /corpus.
#                        Default: "anthem=preset:seed-lstm goethe=preset:seed-rnn" (seconds on one core).
#   NEXTCHAR_TRAIN_ARGS  extra `nextchar train` flags for corpus: models (default "--max-minutes 5").
#   NEXTCHAR_REPO        the model repository (default /models, the compose file's named volume).
#   NEXTCHAR_RETRAIN=1   train again although NAME already has a version (the export adds a version).
# A model that already has a version is skipped, so `compose up` after the first run starts at once.
set -euo pipefail
models=${NEXTCHAR_MODELS:-anthem=preset:seed-lstm goethe=preset:seed-rnn}
repo=${NEXTCHAR_REPO:-/models}
read -r -a train_args <<<"${NEXTCHAR_TRAIN_ARGS:---max-minutes 5}"
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT

for spec in $models; do
  name=${spec%%=*}
  source=${spec#*=}
  kind=${source%%:*}
  value=${source#*:}
  if [ "$name" = "$spec" ] || [ "$kind" = "$source" ] || [ -z "$value" ]; then
    echo "nextchar-train-models: bad NEXTCHAR_MODELS entry '$spec'; want NAME=preset:PRESET or NAME=corpus:CORPUS" >&2
    exit 2
  fi
  if [ "${NEXTCHAR_RETRAIN:-0}" != 1 ] && compgen -G "$repo/$name/[0-9]*/manifest.json" >/dev/null; then
    echo "== $name: already in $repo, skipped (NEXTCHAR_RETRAIN=1 trains again)"
    continue
  fi
  out=$runs/$name
  case $kind in
    preset) nextchar train --preset "$value" --out "$out" --no-progress ;;
    corpus) nextchar train --corpus "$value" --out "$out" --no-progress "${train_args[@]}" ;;
    *)
      echo "nextchar-train-models: unknown source '$kind' in '$spec'; want preset or corpus" >&2
      exit 2
      ;;
  esac
  # The char-rnn trainer keeps its best validation checkpoint; a preset run has only its last one.
  checkpoint=$out/best.pt
  [ -f "$checkpoint" ] || checkpoint=$out/last.pt
  echo "== $name: exported to $(nextchar export --checkpoint "$checkpoint" --repo "$repo" --name "$name")"
done
