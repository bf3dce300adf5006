"""Generated code of the Open Inference Protocol (package inference), made by scripts/gen_proto.py."""
