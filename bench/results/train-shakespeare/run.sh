#!/bin/bash
# The issue-14 quality run: the shakespeare recipe, one thread, 59 minutes of wall time.
cd /work/wt/train
echo "start $(date -u +%FT%TZ) $(cat /proc/loadavg)"
( while sleep 60; do echo "$(date -u +%T) $(cat /proc/loadavg)"; done ) > /work/runs/quality-load.log &
LOADER=$!
nice -n -5 .venv/bin/nextchar train --corpus /work/shared/data/tinyshakespeare.txt --cell lstm --hidden 512 \
  --layers 2 --embedding 64 --dropout 0.5 --batch 64 --seq 128 --lr 3e-3 --schedule cosine-time \
  --max-minutes 59 --eval-every 100 --patience 0 --seed 0 --threads 1 --device cpu --no-progress \
  --out /work/runs/shakespeare-q
echo "rc $? end $(date -u +%FT%TZ) $(cat /proc/loadavg)"
kill $LOADER
