"""The real/bogus classifier: labelled data, model, training and evaluation."""
