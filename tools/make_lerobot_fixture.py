"""Write tests/data/lerobot-v3-real with the lerobot package itself (lerobot 0.4.4, dataset format v3.0).

    python tools/make_lerobot_fixture.py tests/data/lerobot-v3-real

Run once in a throwaway environment that has lerobot >= 0.4 (on Python 3.11 that is 0.4.4, which needs
torch < 2.11: not this project's CPU torch, so it is not a test dependency). The test suite reads the
result without lerobot installed. The small file-size limits spread the 4 episodes over 4 data files in
2 chunks; frames are flat colours, so the lossy AV1 video keeps them within a few levels.
"""

import json
import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root = sys.argv[1]
FPS = 10
LENGTHS = [9, 5, 7, 6]
features = {
    "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"joint_{i}" for i in range(6)]},
    "action": {"dtype": "float32", "shape": (6,), "names": {"motors": [f"m{i}" for i in range(6)]}},
    "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
    "observation.images.front": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]},
}
ds = LeRobotDataset.create(
    "local/vlastore-fixture", fps=FPS, features=features, root=root, robot_type="so100", use_videos=True
)
# small file limits so the episodes spread over several data and video files and two chunks
ds.meta.info["data_files_size_in_mb"] = 0.0001
ds.meta.info["video_files_size_in_mb"] = 0.0025
ds.meta.info["chunks_size"] = 2
rng = np.random.default_rng(0)
truth = {"fps": FPS, "episodes": []}
for ep, n in enumerate(LENGTHS):
    frames = []
    for i in range(n):
        state = rng.normal(size=6).astype(np.float32)
        action = rng.normal(size=6).astype(np.float32)
        colour = [(ep * 60 + i * 9) % 256, (250 - ep * 40 - i * 7) % 256, (i * 25) % 256]
        img = np.empty((48, 64, 3), np.uint8)
        img[:] = colour
        task = "place the cup" if (ep == 2 and i >= 3) else ("open the drawer" if ep == 3 else "pick the cup")
        ds.add_frame(
            {
                "observation.state": state,
                "action": action,
                "next.reward": np.array([i], np.float32),
                "observation.images.front": img,
                "task": task,
            }
        )
        frames.append({"state": state.tolist(), "action": action.tolist(), "task": task, "colour": colour})
    ds.save_episode()
    truth["episodes"].append(frames)
ds.finalize()
with open(f"{root}.truth.json", "w") as f:
    json.dump(truth, f)
print("written", root)
