# A generic step: prints its message.
variable "message" {
  type    = string
  default = "step done"
}

job "step" {
  type = "batch"

  group "step" {
    task "step" {
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
