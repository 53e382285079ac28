"""Stage 2, models: frozen ImageNet backbones (`backbones`, `efficientnet_lite`) and the trainable heads (`heads`)."""
