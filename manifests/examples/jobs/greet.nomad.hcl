# The message reaches the command through the environment, never pasted into the shell script.
variable "message" {
  type    = string
  default = "hello"
}

job "greet" {
  type = "batch"

  group "greet" {
    task "echo" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", "echo \"$MESSAGE\""]
      }

      env {
        MESSAGE = var.message
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
