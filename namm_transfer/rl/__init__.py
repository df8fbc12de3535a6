"""RL transfer: Decision Transformers on MuJoCo with an evicting KV cache.

``python -m namm_transfer.rl`` evaluates a DT under the full cache, a NAMM and the baselines;
``python -m namm_transfer.rl.data`` makes a Minari dataset from a stable-baselines3 behaviour policy;
``python -m namm_transfer.rl.train`` trains a ``transformers.DecisionTransformerModel`` on it.
"""
