// Small progressive enhancements; every page works without them.
(function () {
  let lastPrompt = null;

  document.addEventListener("focusin", (e) => {
    if (e.target.matches("#id_user_prompt, #id_system_prompt")) lastPrompt = e.target;
  });

  document.addEventListener("click", (e) => {
    const insert = e.target.closest("[data-insert]");
    if (insert) {
      const field = lastPrompt || document.getElementById("id_user_prompt");
      if (!field) return;
      const text = "{{ " + insert.dataset.insert + " }}";
      const start = field.selectionStart ?? field.value.length;
      field.value = field.value.slice(0, start) + text + field.value.slice(field.selectionEnd ?? start);
      field.focus();
      field.selectionStart = field.selectionEnd = start + text.length;
      return;
    }
    const preset = e.target.closest("[data-preset]");
    if (preset) {
      const data = JSON.parse(preset.dataset.preset);
      for (const [key, value] of Object.entries(data)) {
        const field = document.getElementById("id_" + key);
        if (!field || value === null || value === undefined) continue;
        if (field.tagName === "SELECT" && ![...field.options].some((o) => o.value === String(value))) continue;
        field.value = value;
      }
    }
  });

  document.addEventListener("submit", (e) => {
    const message = e.target.dataset.confirm;
    if (message && !window.confirm(message)) e.preventDefault();
  });

  function wireDropzone() {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("id_file");
    if (!zone || !input) return;
    const show = () => {
      document.getElementById("filename").textContent = input.files.length ? input.files[0].name : "";
    };
    input.addEventListener("change", show);
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
    });
  }
  document.addEventListener("DOMContentLoaded", wireDropzone);
})();
