"""Write SPLIT repeated N times (ids made unique) beside it, as SPLIT_xN.jsonl, so that batch_size: auto is not capped
by the 200-record samples (it keeps 10 optimizer steps per epoch).   python bench/repeat_split.py SPLIT.jsonl N"""

import json
import sys

src, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(src)]
with open(src.replace(".jsonl", f"_x{n}.jsonl"), "w") as f:
    for i in range(n):
        for r in rows:
            f.write(json.dumps({**r, "id": f"{r['id']}_{i}"}) + "\n")
print(src.replace(".jsonl", f"_x{n}.jsonl"))
