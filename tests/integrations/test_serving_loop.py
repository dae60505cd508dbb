import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_serving_loop_recipe_matches_per_user_loop():
    spec = importlib.util.spec_from_file_location("serve", ROOT / "integrations/serving_loop/serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    assert serve.main(["--steps", "4"]) < 1e-4  # fp32 on CPU
