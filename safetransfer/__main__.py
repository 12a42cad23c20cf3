from safetransfer.train import main

main()
