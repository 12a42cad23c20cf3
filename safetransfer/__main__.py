from safetransfer.commands.train import main

main()
