from server.cli import main

# vLLM spawns its engine processes, which import this module again, so the
# server must only start under this guard.
if __name__ == "__main__":
    main()
