#!/bin/bash
cd /work/main
echo "start $(date -u +%FT%TZ) $(cat /proc/loadavg)"
( while sleep 60; do echo "$(date -u +%T) $(cat /proc/loadavg)"; done ) > /work/runs/quality4-load.log &
LOADER=$!
.venv/bin/nextchar train --preset shakespeare --corpus /work/shared/data/tinyshakespeare.txt \
  --dropout 0.4 --input-dropout 0.1 --weight-decay 0.1 --ema 0.998 --max-minutes 59 --threads 2 --device cpu \
  --no-progress --sample-chars 0 --seed 0 --out /work/runs/shakespeare-q4
echo "rc $? end $(date -u +%FT%TZ) $(cat /proc/loadavg)"
kill $LOADER
