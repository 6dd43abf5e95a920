"""``python -m workers.fleet --scenario FILE``: the fleet without the llmq CLI."""

from workers.fleet.command import fleet_command

if __name__ == "__main__":
    fleet_command(prog_name="python -m workers.fleet")
